"""The domain-adaptation demos of README: what continued pre-training forgets, and what fine-tuning changes inside.

    python -m bench.continual --demo forgetting   # gpt-tiny pre-trained on the default corpus (Python's docs), then
                                                  # adapted to tinyshakespeare: plain (S steps), --replay-ratio 0.25
                                                  # (S / 0.75 steps: as many Shakespeare tokens), EWC and LoRA (S
                                                  # steps); every run watches the docs' validation split
    python -m bench.continual --demo inside       # MiniLM fine-tuned on the SST-2 4,000-sentence subset (full and
                                                  # LoRA, one epoch): `tinygraft cka` of each against the base, layer
                                                  # by layer, on the 872 dev sentences; `tinygraft probe` over MiniLM

Writes bench/results/cpu/forgetting.{md,json,png} or cka-full.*, cka-lora.*, probe-sst2.* (the commands' own files).
"""

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from tinygraft.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "bench" / "results" / "cpu"


def once(out: Path, *args) -> None:
    """A training command, unless --work already holds its finished run (a rerun redoes only what changed)."""
    if not (out / "results.json").is_file():
        tg(*args[:1], "--out", out, "--overwrite", *args[1:])


def tg(*args) -> str:
    """One tinygraft command in this process; its stdout."""
    args = [str(a) for a in args]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    if code != 0:
        raise SystemExit(f"tinygraft {' '.join(args)} exited {code}")
    return buf.getvalue()


def forgetting(work: Path, out: Path, quick: bool, ewc: float) -> None:
    base_steps, s = (6, 4) if quick else (600, 300)
    small = ["--set", "train.eval_every=2"] if quick else ["--set", f"train.eval_every={s // 6}"]
    base, shakespeare = work / "docs", SHARED / "tinyshakespeare" / "input.txt"
    once(base, "pretrain", "--preset", "gpt-tiny", "--steps", base_steps, "--seed", 0)
    common = ["--from", base, "--data", shakespeare, "--watch", "pydoc_data.topics", "--seed", 0]
    longer = round(s / 0.75)  # as many Shakespeare rows as the others see: a quarter of each batch is replay
    replay = ["--replay", "pydoc_data.topics", "--replay-ratio", 0.25]
    plans = {
        "plain": ["--steps", s, *small],
        "replay-0.25": ["--steps", longer, *replay, "--set", f"train.eval_every={max(1, longer // 6)}"],
        f"ewc-{ewc:g}": ["--steps", s, *small, "--ewc", ewc],
        "lora": ["--steps", s, *small, "--method", "lora"],
    }
    for name, flags in plans.items():
        print(f"-- {name}", flush=True)
        once(work / name, "pretrain", *common, *flags)
    out.mkdir(parents=True, exist_ok=True)
    table = tg("forgetting", *(work / n for n in plans), "--out", out, "--overwrite")
    (out / "forgetting.md").write_text(table)
    print(table)


def inside(work: Path, out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sst2 = SHARED / "sst2"
    data = ["--train", sst2 / "train.tsv", "--val", sst2 / "dev.tsv", "--text-col", "sentence", "--max-train",
            64 if quick else 4000, "--epochs", 1, "--seed", 0]  # fmt: skip
    dev = work / "dev.txt"
    lines = (sst2 / "dev.tsv").read_text().splitlines()[1:]
    dev.write_text("\n".join(line.split("\t")[0] for line in lines[: 32 if quick else None]) + "\n")
    for name, method in (("full", []), ("lora", ["--method", "lora"])):
        print(f"-- fine-tuning: {name}", flush=True)
        once(work / name, "finetune", "--from", "minilm", *data, *method, *(["--max-val", 32] if quick else []))
        print(tg("cka", "minilm", work / name, "--data", dev, "--out", work / "cka", "--overwrite"))
        for suffix in ("json", "png"):
            (out / f"cka-{name}.{suffix}").write_bytes((work / "cka" / f"cka.{suffix}").read_bytes())
    print("-- probe", flush=True)
    probe_data = [*data[:6], "--max-train", 64 if quick else 4000] + (["--max-val", 32] if quick else [])
    table = tg("probe", "minilm", *probe_data, "--out", work / "probe", "--overwrite")
    for suffix in ("json", "png"):
        (out / f"probe-sst2.{suffix}").write_bytes((work / "probe" / f"probe.{suffix}").read_bytes())
    (out / "probe-sst2.md").write_text(table)
    print(table)
    for name in ("full", "lora"):
        r = json.loads((work / name / "results.json").read_text())
        print(f"{name}: accuracy {r['metrics']['accuracy']:.4f}, trainable {r['trainable_params']:,}")


def main_(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", choices=("forgetting", "inside"), required=True)
    p.add_argument("--ewc", type=float, default=1e4, help="EWC's lambda in the forgetting demo")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the script, measures nothing")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        out = work / "results" if args.quick else OUT  # a check of the script leaves the committed results alone
        if args.demo == "forgetting":
            forgetting(work, out, args.quick, args.ewc)
        else:
            inside(work, out, args.quick)


if __name__ == "__main__":
    main_()
