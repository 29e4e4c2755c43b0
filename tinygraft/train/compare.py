"""`tinygraft compare`: several fine-tuning methods on one task and base model, the table the literature argues about.

    tinygraft compare --from minilm --train sst2/train.tsv --val sst2/dev.tsv --text-col sentence \\
        --methods full,linear-probe,top-2,gradual-unfreeze,lora --seeds 0,1,2 --out runs/sst2-compare

Trustworthy by construction: every (method, seed) is its own `finetune` process (`python -m tinygraft finetune
--config OUT/configs/<method>-seed-<s>.json`), so its peak memory is its own; the settings are the same for all, so
is the data (the same files, the same fixed `--max-train` subset), the seed (head init, batch order: the batcher's
permutation depends on the seed alone, not on the method) and the number of steps. Only the learning rate differs:
each method runs at its own default (train/methods/), overridden for all by `--lr` or per method by `--lr-for
lora=1e-3`: one lr for all would misjudge the methods that need larger steps. A method flag (`--lora-r 4`) goes to
the methods it applies to.

A finished run is reused when compare is run again only if everything that defines it is equal (its saved settings
and the sha256 of its data files); a run stopped part-way with the very settings compare gives it continues from its
last checkpoint (`finetune --resume`); any other run in the way is started over. Writes OUT/compare.md,
compare.json, compare.png and each run under OUT/<method>/seed-<seed>/ (logs in OUT/logs/).
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tinygraft.core import checkpoint
from tinygraft.core.checkpoint import atomic_write, list_steps
from tinygraft.core.config import to_dict
from tinygraft.core.jsonfile import read_json
from tinygraft.data import arrow
from tinygraft.errors import TinygraftError
from tinygraft.train import board, methods, runs
from tinygraft.train.config import FinetuneConfig
from tinygraft.train.plugins import child_env


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


def lr_of(method: str, lr_for: dict[str, float], lr: float | None) -> float | None:
    """A method's rate: --lr-for's, else --lr, else its default; None for one that takes no step (zero-shot)."""
    if methods.lookup(method)[0].trains_nothing:
        return None
    return lr_for.get(method, lr if lr is not None else methods.default_lr(method))


def child_config(cfg: FinetuneConfig, method: str, seed: int, lr: float, given: dict) -> FinetuneConfig:
    """The settings of one (method, seed) run: `cfg` with that method (and the given method settings it takes),
    seed and learning rate."""
    cls, _ = methods.lookup(method, "finetune")
    own = {f.name for f in dataclasses.fields(cls.Settings)}
    settings = methods.settings_for(method, {k: v for k, v in given.items() if k in own}, "finetune")
    train = dataclasses.replace(cfg.train, seed=seed, lr=lr)
    return dataclasses.replace(cfg, method=method, method_settings=settings, train=train)


def data_digests(cfg: FinetuneConfig) -> dict:
    paths = {"train": cfg.data.train, "val": cfg.data.val}
    digests = {k: arrow.data_sha256(v, "validation" if k == "val" else "train") for k, v in paths.items()}
    return {k: d for k, d in digests.items() if d is not None}  # as finetune.data_digests records them


def saved_settings(out: Path) -> tuple[dict | None, dict]:
    """(the run's saved settings, the data digests of its latest checkpoint), or (None, {}) when unreadable."""
    try:
        config = runs.upgrade(read_json(out / "config.json", "run config"))
        state = read_json(checkpoint.resolve(out) / checkpoint.TRAINER_STATE, "checkpoint file")
    except (TinygraftError, OSError):
        return None, {}
    return config.get("finetune"), state.get("data_sha256") or {}


def run_one(child: FinetuneConfig, out: Path, log: Path, threads: int | None, overwrite: bool) -> dict:
    """One finetune process: reused when finished with these very settings and data, resumed when stopped with
    them, else (re)started."""
    intended, digests = to_dict(child), data_digests(child)
    saved, saved_digests = saved_settings(out) if not overwrite else (None, {})
    same = saved == intended and all(saved_digests.get(k) == v for k, v in digests.items())
    results = out / "results.json"
    if same and results.is_file():
        done = read_json(results, "results file")
        if done.get("status") in ("completed", "early-stopped"):
            return done
    config_file = log.parent.parent / "configs" / f"{log.stem}.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(config_file, json.dumps(intended, indent=2) + "\n")
    if same and list_steps(out / "checkpoints"):
        cmd = [sys.executable, "-m", "tinygraft", "finetune", "--out", str(out), "--resume"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "tinygraft",
            "finetune",
            "--config",
            str(config_file),
            "--out",
            str(out),
            "--overwrite",
        ]
    env = child_env(dict(os.environ))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        code = wait_for(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True),
                        f"the {child.method} run (seed {child.train.seed})")  # fmt: skip
    if code != 0:
        lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {code}"
        raise TinygraftError(
            f"the {child.method} run (seed {child.train.seed}) failed: {last.removeprefix('error: ')} (log: {log})"
        )
    return read_json(results, "results file")


def wait_for(proc: subprocess.Popen, what: str) -> int:
    """The child's exit code. A Ctrl-C reaches compare alone (the child has a session of its own) and is handed on
    once, so the run finishes its step and saves a checkpoint; compare then stops too (exit 130), and the same
    compare command later resumes that run. A second Ctrl-C stops the run at once, without saving."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        print(f"interrupt: {what} saves a checkpoint after its current step (Ctrl-C again to stop it at once)",
              file=sys.stderr, flush=True)  # fmt: skip
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise KeyboardInterrupt from None


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))  # sample std (n - 1)


def summarize(method: str, runs_: list[dict]) -> dict:
    metric = runs_[0]["metric"]
    values = [r["metrics"].get(metric, float("nan")) for r in runs_]
    m, s = mean_std(values)
    first = runs_[0]
    secs = [r.get("train_seconds_excl_eval", r["train_seconds"]) for r in runs_]
    trainable = first.get("trainable_params_max", first["trainable_params"])
    return {
        "method": method,
        "lr": first.get("lr"),
        "trainable_params": trainable,
        "total_params": first["total_params"],
        "trainable_pct": 100.0 * trainable / first["total_params"],
        "optimizer_state_mb": mean_std([r["optimizer_state_mb"] for r in runs_])[0],
        "peak_memory_mb": mean_std([r["peak_memory_mb"] for r in runs_])[0],
        "train_seconds": mean_std(secs)[0],
        "tokens_per_s": mean_std([r["tokens_seen"] / max(t, 1e-9) for r, t in zip(runs_, secs)])[0],
        "metric": metric,
        "mean": m,
        "std": s,
        "values": values,
        "seeds": [r.get("seed") for r in runs_],
        "steps": first["steps"],
    }


def markdown(rows: list[dict], title: str) -> str:
    metric = rows[0]["metric"]
    head = (
        "| method | lr | trainable params | trainable % | optimizer state MB | peak MB | train s | tokens/s | "
        f"{metric} (mean ± std, n) |"
    )
    lines = [f"### {title}", "", head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {r['trainable_pct']:.3g} | "
            f"{r['optimizer_state_mb']:.1f} | {r['peak_memory_mb']:.0f} | {r['train_seconds']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['mean']:.4f} ± {r['std']:.4f} ({len(r['values'])}) |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="tab:blue")
    lo = min(r["mean"] - r["std"] for r in rows)
    hi = max(r["mean"] + r["std"] for r in rows)
    axes[0].set_ylim(max(0.0, lo - 0.1 * (hi - lo + 1e-3)), hi + 0.1 * (hi - lo + 1e-3))
    axes[0].set_ylabel(f"val {rows[0]['metric']} (mean ± std)")
    axes[1].bar(names, [r["trainable_pct"] for r in rows], color="tab:orange")
    log = any(r["trainable_pct"] > 0 for r in rows)  # zero-shot and few-shot alone: nothing to put on a log axis
    if log:
        axes[1].set_yscale("log")
    axes[1].set_ylabel("trainable parameters, %" + (" (log)" if log else ""))
    axes[2].bar(names, [r["train_seconds"] for r in rows], color="tab:green")
    axes[2].set_ylabel("train seconds")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(
    cfg: FinetuneConfig,
    out: str | Path,
    names: list[str],
    seeds: list[int],
    lr_for: dict[str, float],
    method_settings: dict | None = None,
    threads: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run every method for every seed (seed-major, so a partial compare has every method for the first seed).
    `method_settings`: the method flags given, each passed to the methods it applies to."""
    out = Path(out)
    given = dict(method_settings or {})
    unknown = sorted(set(lr_for) - set(names))
    if unknown:
        raise TinygraftError(f"--lr-for names {unknown[0]!r}, which is not in --methods")
    board.require(cfg.train.tensorboard)
    for m in names:  # every name and setting checked before the first run starts
        child_config(cfg, m, seeds[0], 1.0, given)
    taken = {f.name for m in names for f in dataclasses.fields(methods.lookup(m)[0].Settings)}
    stray = sorted(set(given) - taken)
    if stray:
        raise TinygraftError(
            f"--{methods.flag_of(stray[0]) or stray[0]} applies to none of --methods {','.join(names)}"
        )
    lrs = {m: lr_of(m, lr_for, cfg.train.lr) for m in names}
    results: dict[str, list[dict]] = {m: [] for m in names}
    total, i = len(names) * len(seeds), 0
    t0 = time.perf_counter()
    for seed in seeds:
        for m in names:
            i += 1
            child = child_config(cfg, m, seed, lrs[m], given)
            r = run_one(child, out / m / f"seed-{seed}", out / "logs" / f"{m}-seed-{seed}.log", threads, overwrite)
            results[m].append(r)
            secs = r.get("train_seconds_excl_eval", r["train_seconds"])
            value = r["metrics"].get(r["metric"], float("nan"))
            print(
                f"[{i}/{total}] {m} seed {seed} ({'no training' if lrs[m] is None else f'lr {lrs[m]:g}'}): "
                f"{r['metric']} {value:.4f}, {secs:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    rows = [summarize(m, results[m]) for m in names]
    steps = max(r["steps"] for r in rows)  # (zero-shot and few-shot take none)
    data = Path(cfg.data.train).name if cfg.data.train else "the stdlib docstring demo"
    title = (
        f"{cfg.task} on {data} from {Path(cfg.source).name}: {steps} steps of {cfg.train.batch_size}, "
        f"seeds {','.join(map(str, seeds))}"
    )
    report = {"title": title, "rows": rows, "settings": to_dict(cfg), "wall_seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "compare.md", markdown(rows, title))
    plot(rows, out / "compare.png", title)
    return report
