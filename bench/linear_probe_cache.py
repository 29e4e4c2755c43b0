"""A linear probe with and without the pooled-feature cache: MiniLM on SST-2, three epochs, the same run otherwise.

The probe's backbone is frozen and in eval mode, so each example pools to the same vector every epoch; with the
cache (the default) the backbone runs once per example and later epochs and evaluations cost the head alone
(models/heads.py: PooledCache). Both runs are `finetune --method linear-probe` in this process, on the fixed
4,000-sentence subset, max length 64, batch 32, 3 epochs (375 steps), evaluated on the 872 dev sentences each epoch.

Reported: train seconds (evaluations included: the cache serves them too), dev accuracy, the cache's counts.

    python -m bench.linear_probe_cache
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import Results
from tinygraft.train.finetune import FinetuneArgs, finetune

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def run(out: Path, cache: bool, args) -> dict:
    settings = {"source": "minilm", "data.train": str(DATA / "train.tsv"), "data.val": str(DATA / "dev.tsv"),
                "data.text_col": "sentence", "method": "linear-probe", "train.epochs": args.epochs,
                "train.batch_size": 32, "data.max_length": 64, "data.max_train": args.n_train, "train.seed": 0,
                "method_settings.feature_cache": cache}  # fmt: skip
    fa = FinetuneArgs(out=str(out), flags=settings)
    return finetune(fa).results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=4000)
    args = p.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"SST-2 not found at {DATA}")
    res = Results(
        "linear_probe_cache",
        torch.device("cpu"),
        notes={
            "recipe": f"MiniLM-L6 linear probe on SST-2: {args.n_train} train sentences, max length 64, batch 32, "
            f"{args.epochs} epochs, lr 3e-3, evaluated each epoch on the 872 dev sentences",
            "timing": "train_seconds of results.json (evaluations included); shared CPU, noisy",
            "threads": torch.get_num_threads(),
        },
    )
    with tempfile.TemporaryDirectory() as d:
        for cache in (True, False):
            r = run(Path(d) / f"cache-{cache}", cache, args)
            fc = r.get("feature_cache") or {}
            res.add(
                feature_cache="on" if cache else "off",
                train_s=r["train_seconds"],
                accuracy=r["metrics"]["accuracy"],
                cached_examples=fc.get("examples", 0),
                cached_reads=fc.get("hits", 0),
            )
    res.table(["feature_cache", "train_s", "accuracy", "cached_examples", "cached_reads"])
    on, off = res.rows
    res.data["notes"]["speedup"] = off["train_s"] / on["train_s"]
    print(
        f"speed-up from the cache: {res.data['notes']['speedup']:.2f}x; accuracy {on['accuracy']:.4f} (cached) "
        f"vs {off['accuracy']:.4f}"
    )
    res.save()
    res.plot(x="feature_cache", y="train_s", series="feature_cache", ylabel="train seconds (3 epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
