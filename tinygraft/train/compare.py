"""`tinygraft compare`: several fine-tuning methods on one task and base model, the table the literature argues about.

    tinygraft compare --from minilm --train sst2/train.tsv --val sst2/dev.tsv --text-col sentence \
        --methods full,linear-probe,top-2,gradual-unfreeze,lora --seeds 0,1,2 --out runs/sst2-compare

Trustworthy by construction: every (method, seed) is its own `finetune` process (`python -m
tinygraft finetune ...`), so its peak memory is its own; the flags are the same for all, so
is the data (the same files, the same fixed `--max-train` subset), the seed (head init, batch order: the batcher's
permutation depends on the seed alone, not on the method) and the number of steps. Only the learning rate differs:
each method runs at its own documented default (finetune_methods.DEFAULT_LR), overridden for all by `--lr` or per
method by `--lr-for lora=1e-3`: one lr for all would misjudge the methods that need larger steps.

A finished run (its results.json says completed or early-stopped) is reused when compare is run again, and a run
stopped part-way with the very flags compare would give it continues from its last checkpoint (`finetune --resume`),
so an interrupted compare goes on where it stopped; `--overwrite` re-runs everything. Writes OUT/compare.md,
compare.json, compare.png and each run under OUT/<method>/seed-<seed>/ (logs in OUT/logs/).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tinygraft.core.checkpoint import atomic_write, list_steps
from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.train.finetune import run_settings
from tinygraft.train.finetune_methods import default_lr, make_method


def parse_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise TinygraftError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise TinygraftError(f"--{what} names {text!r} with a repeat")
    return items


def parse_lr_for(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or out[name.strip()] <= 0:
            raise TinygraftError(f"--lr-for {item!r} must be METHOD=LR with a positive number, e.g. lora=1e-3")
    return out


def to_argv(a) -> list[str]:
    """FinetuneArgs -> the `finetune` flags that differ from the defaults (out, method, seed, lr set by the caller)."""
    from tinygraft.train.finetune import FinetuneArgs

    defaults = FinetuneArgs(out="")
    argv = []
    for f in dataclasses.fields(a):
        value = getattr(a, f.name)
        if f.name in ("out", "method", "seed", "lr", "overwrite") or value == getattr(defaults, f.name):
            continue
        flag = "--from" if f.name == "from_" else "--" + f.name.replace("_", "-")
        if isinstance(value, bool):  # (only a non-default value gets here)
            argv += [flag] if value else ["--no-" + f.name.replace("_", "-")]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_one(base_argv: list[str], method: str, seed: int, lr: float, out: Path, log: Path, threads: int | None,
            overwrite: bool, intended: dict) -> dict:  # fmt: skip
    """One finetune process: reused when finished, resumed when stopped with the same flags, else (re)started.
    `intended` is the `finetune` section the run's config.json holds when it was started with these flags."""
    results = out / "results.json"
    if results.is_file() and not overwrite:
        done = read_json(results, "results file")
        if done.get("status") in ("completed", "early-stopped") and done.get("lr") == lr:
            return done
    if not overwrite and _resumable(out, intended):
        cmd = [sys.executable, "-m", "tinygraft", "finetune", "--out", str(out), "--resume"]
    else:
        cmd = [sys.executable, "-m", "tinygraft", "finetune", *base_argv, "--method", method,
               "--seed", str(seed), "--lr", repr(lr), "--out", str(out), "--overwrite"]  # fmt: skip
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {code}"
        raise TinygraftError(f"the {method} run (seed {seed}) failed: {last.removeprefix('error: ')} (log: {log})")
    return read_json(results, "results file")


def _resumable(out: Path, intended: dict) -> bool:
    """A run stopped part-way (Ctrl-C, a killed process) with a checkpoint and exactly the flags compare gives it."""
    if not (out / "config.json").is_file() or not list_steps(out / "checkpoints"):
        return False
    try:
        return read_json(out / "config.json", "run config").get("finetune") == intended
    except TinygraftError:
        return False


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))  # sample std (n - 1)


def summarize(method: str, runs: list[dict]) -> dict:
    metric = runs[0]["metric"]
    values = [r["metrics"].get(metric, float("nan")) for r in runs]
    m, s = mean_std(values)
    first = runs[0]
    secs = [r.get("train_seconds_excl_eval", r["train_seconds"]) for r in runs]
    return {
        "method": method,
        "lr": first.get("lr"),
        "trainable_params": first["trainable_params_max"] if "trainable_params_max" in first else first[
            "trainable_params"],
        "total_params": first["total_params"],
        "trainable_pct": 100.0 * first.get("trainable_params_max", first["trainable_params"]) / first["total_params"],
        "optimizer_state_mb": mean_std([r["optimizer_state_mb"] for r in runs])[0],
        "peak_memory_mb": mean_std([r["peak_memory_mb"] for r in runs])[0],
        "train_seconds": mean_std(secs)[0],
        "tokens_per_s": mean_std([r["tokens_seen"] / max(t, 1e-9) for r, t in zip(runs, secs)])[0],
        "metric": metric,
        "mean": m,
        "std": s,
        "values": values,
        "seeds": [r.get("seed") for r in runs],
        "steps": first["steps"],
    }


def markdown(rows: list[dict], title: str) -> str:
    metric = rows[0]["metric"]
    head = ("| method | lr | trainable params | trainable % | optimizer state MB | peak MB | train s | tokens/s | "
            f"{metric} (mean ± std, n) |")  # fmt: skip
    lines = [f"### {title}", "", head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {r['trainable_pct']:.3g} | "
            f"{r['optimizer_state_mb']:.1f} | {r['peak_memory_mb']:.0f} | {r['train_seconds']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['mean']:.4f} ± {r['std']:.4f} ({len(r['values'])}) |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="tab:blue")
    lo = min(r["mean"] - r["std"] for r in rows)
    hi = max(r["mean"] + r["std"] for r in rows)
    axes[0].set_ylim(max(0.0, lo - 0.1 * (hi - lo + 1e-3)), hi + 0.1 * (hi - lo + 1e-3))
    axes[0].set_ylabel(f"val {rows[0]['metric']} (mean ± std)")
    axes[1].bar(names, [r["trainable_pct"] for r in rows], color="tab:orange")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("trainable parameters, % (log)")
    axes[2].bar(names, [r["train_seconds"] for r in rows], color="tab:green")
    axes[2].set_ylabel("train seconds")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(a, methods: list[str], seeds: list[int], lr_for: dict[str, float], threads: int | None = None) -> dict:
    """Run every method for every seed (seed-major, so a partial compare has every method for the first seed)."""
    out = Path(a.out)
    unknown = sorted(set(lr_for) - set(methods))
    if unknown:
        raise TinygraftError(f"--lr-for names {unknown[0]!r}, which is not in --methods")
    for m in methods:  # every name checked (and lora's module found) before the first run starts
        make_method(m, every=1)
    base_argv = to_argv(a)
    lrs = {m: lr_for.get(m, a.lr if a.lr is not None else default_lr(m)) for m in methods}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    total, i = len(methods) * len(seeds), 0
    t0 = time.perf_counter()
    for seed in seeds:
        for m in methods:
            i += 1
            intended = run_settings(dataclasses.replace(a, method=m, seed=seed, lr=lrs[m]))
            r = run_one(base_argv, m, seed, lrs[m], out / m / f"seed-{seed}", out / "logs" / f"{m}-seed-{seed}.log",
                        threads, a.overwrite, intended)  # fmt: skip
            runs[m].append(r)
            secs = r.get("train_seconds_excl_eval", r["train_seconds"])
            value = r["metrics"].get(r["metric"], float("nan"))
            print(f"[{i}/{total}] {m} seed {seed} (lr {lrs[m]:g}): {r['metric']} {value:.4f}, {secs:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    rows = [summarize(m, runs[m]) for m in methods]
    first = runs[methods[0]][0]
    title = (f"{a.task} on {Path(a.train).name if a.train else 'the stdlib docstring demo'} from "
             f"{Path(a.from_).name}: {first['steps']} steps of {a.batch_size}, "
             f"seeds {','.join(map(str, seeds))}")  # fmt: skip
    report = {"title": title, "rows": rows, "argv": base_argv, "wall_seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "compare.md", markdown(rows, title))
    plot(rows, out / "compare.png", title)
    return report


def compare_command(ns) -> int:
    from tinygraft.train.finetune_cli import finetune_args_from

    methods = parse_list(ns.methods, "methods")
    try:
        seeds = [int(s) for s in parse_list(ns.seeds, "seeds")]
    except ValueError:
        raise TinygraftError(f"--seeds {ns.seeds!r} must be comma-separated integers") from None
    a = finetune_args_from(ns, method=methods[0], seed=seeds[0])
    from tinygraft.train.finetune import check_args

    check_args(a)
    report = compare(a, methods, seeds, parse_lr_for(ns.lr_for), ns.threads)
    print(markdown(report["rows"], report["title"]))
    print(f"wrote {Path(a.out) / 'compare.md'}, compare.json and compare.png", file=sys.stderr)
    return 0
