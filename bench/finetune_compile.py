"""Does `finetune --compile` pay on this machine? The SST-2 recipe of bench/finetune_vs_hf.py (MiniLM, 4,000
sentences, max length 64, batch 32, one epoch), eager against torch.compile, in fp32 and `auto` precision.

Under --compile the batches pad to multiples of 16 (data/labeled.py: BUCKET) and the length dimension is marked
dynamic, so the graph compiles for a few shapes instead of once per batch length. Reported per run: the optimizer
steps' time, the run's wall time (steps, the evaluation at the end, the checkpoint), the seconds Dynamo and Inductor
spent compiling inside it (their own tally, evaluation's graphs included), the wall time without them, and the dev
accuracy. `--compile` stays off by default
unless it wins end to end.

    python -m bench.finetune_compile [--precisions fp32,auto] [--n-train 4000]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import Results
from bench.finetune_vs_hf import DATA, LR, run_tinygraft, subset_file


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", default="fp32,auto")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.method, args.lr = "full", LR["full"]
    if not DATA.is_dir():
        sys.exit(f"SST-2 not found at {DATA}")
    recipe = f"bench/finetune_vs_hf.py's, full, seed {args.seed}, {args.n_train} sentences"
    res = Results("finetune_compile", torch.device("cpu"), notes={"recipe": recipe})
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train = subset_file(tmp, args.n_train)
        for prec in args.precisions.split(","):
            for compiled in (False, True):
                r = run_tinygraft(train, args.seed, args, tmp, prec, compile_=compiled)
                row = res.add(precision=r["precision"], mode="compile" if compiled else "eager",
                              train_s=r["train_s"], compile_s=r["compile_s"],
                              wall_s=r["wall_s"], without_compile_s=r["wall_s"] - r["compile_s"],
                              accuracy=r["accuracy"])  # fmt: skip
                print(f"{prec} {row['mode']}: {row['train_s']:.1f} s ({row['compile_s']:.1f} s compiling), "
                      f"accuracy {row['accuracy']:.4f}", flush=True)  # fmt: skip
    res.table(["precision", "mode", "train_s", "wall_s", "compile_s", "without_compile_s", "accuracy"])
    for prec in dict.fromkeys(r["precision"] for r in res.rows):
        rows = {r["mode"]: r for r in res.rows if r["precision"] == prec}
        eager, comp = rows["eager"], rows["compile"]
        print(f"{prec}: compile / eager end to end {comp['wall_s'] / eager['wall_s']:.2f}x, without the compiling "
              f"{comp['without_compile_s'] / eager['wall_s']:.2f}x")  # fmt: skip
    res.save()
    for r in res.rows:
        r["run"] = f"{r['precision']} {r['mode']}"
    res.plot(x="run", y="wall_s", series="mode", ylabel="seconds, one epoch (with compiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
