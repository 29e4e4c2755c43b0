"""The `finetune`, `predict` and `compare` subcommands; `add_finetune_commands(sub)` adds them to `tinygraft`.

`python -m tinygraft.train.finetune_cli finetune ...` runs one without the main CLI: `compare` starts each method
this way, one process per method and seed, so each process's peak memory is that method's own.
"""

from __future__ import annotations

import argparse
import json
import sys

from tinygraft.train.lora_cli import add_lora_arguments

INTERRUPTED = 130


def add_finetune_flags(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """The flags `finetune` and `compare` share (compare takes --methods / --seeds / --lr-for on top)."""
    d = p.add_argument
    d("--from", dest="from_", metavar="PATH", default="minilm",
      help="HF model directory, 'minilm' (default), or a tinygraft run")
    d("--task", default="classify", choices=("classify", "tokens", "qa", "similarity", "instruct"))
    d("--train", help="training data (TSV/CSV/JSONL, CoNLL, SQuAD JSON); omitted: the stdlib docstring demo")
    d("--val", help="validation data (a SQuAD JSON given as --train alone is split by article)")
    d("--out", required=True, help="run directory" + (" holding one run per method and seed" if compare else ""))
    if not compare:
        d("--method", default="full", help="full, linear-probe, top-k (or top-K: top-2), gradual-unfreeze, lora")
        d("--seed", type=int, default=0, help="head init, data order and dropout")
    d("--epochs", type=int, default=3, help="passes over the training data (default 3)")
    d("--steps", type=int, help="optimizer steps (overrides --epochs)")
    d("--batch-size", type=int, default=32)
    d("--eval-batch-size", type=int, default=64)
    d("--max-length", type=int, default=128, help="tokens per example, special tokens included")
    d("--lr", type=float, help="peak learning rate (default: the method's own, see finetune_methods.DEFAULT_LR)")
    d("--warmup", type=float, default=0.1, help="warmup as a fraction of the steps (then linear decay to 0)")
    d("--weight-decay", type=float, default=0.01)
    d("--eval-every", type=int, help="steps between evaluations (default: one epoch)")
    d("--patience", type=int, help="stop after this many evaluations without a better validation metric")
    d("--keep", type=int, default=1, help="step checkpoints kept besides the best")
    d("--device", default="auto")
    d("--compile", action="store_true", help="torch.compile the model")
    d("--max-train", type=int, help="use a fixed random subset of this many training examples")
    d("--max-val", type=int, help="use a fixed random subset of this many validation examples")
    d("--text-col", help="text column (classify: text; tokens: tokens; qa: question; similarity: sentence1)")
    d("--text-pair-col", help="second text column (sentence pairs; qa: context; similarity: sentence2)")
    d("--label-col", help="label column (classify: label; tokens: tags; qa: answer; similarity: score)")
    d("--answer-start-col", help="QA tables: the answer's character offset in the context")
    d("--quote-none", action="store_true", help="read quote characters as text (STS-B)")
    d("--problem", default="single_label", choices=("single_label", "multi_label", "regression"))
    d("--pooling", choices=("cls", "mean", "max", "pooler", "last"), help="default: the checkpoint's own")
    d("--dropout", type=float, default=0.1, help="dropout before the head's classifier")
    d("--similarity-loss", default="cosine", choices=("cosine", "contrastive"))
    d("--max-score", type=float, default=5.0, help="similarity: the label scale (STS-B 0..5)")
    d("--doc-stride", type=int, help="QA: overlap of the context windows")
    d("--top-k", type=int, help="top-k: blocks that train (default 2)")
    d("--no-feature-cache", dest="feature_cache", action="store_false",
      help="linear-probe: run the frozen backbone on every batch instead of caching each example's pooled features")
    d("--unfreeze-every", type=int, help="gradual-unfreeze: steps between unfreezing two groups "
      "(default: one epoch, or steps / groups if shorter)")
    d("--layer-lr-decay", type=float,
      help="discriminative lr: factor per block going down (e.g. 0.8, or 0.385 = ULMFiT's 1/2.6)")
    add_lora_arguments(p)
    d("--overwrite", action="store_true", help="replace a run already in --out")
    if not compare:
        d("--resume", action="store_true", help="continue the run in --out from its latest checkpoint (its own "
          "saved settings; --device may change)")
        d("--stop-at", type=int, metavar="STEP", help="stop after this step (leaves a checkpoint to --resume)")


def finetune_args_from(ns: argparse.Namespace, **changes):
    from tinygraft.train.finetune import FinetuneArgs

    names = {f for f in FinetuneArgs.__dataclass_fields__}
    values = {k: v for k, v in vars(ns).items() if k in names}
    return FinetuneArgs(**{**values, **changes})


def cmd_finetune(ns) -> int:
    from tinygraft.train.finetune import finetune

    outcome = finetune(finetune_args_from(ns))
    if outcome.status == "interrupted":
        print(f"interrupted: saved step {outcome.step} in {ns.out}/checkpoints; continue with "
              f"'tinygraft finetune --out {ns.out} --resume'", file=sys.stderr)
        return INTERRUPTED
    if outcome.status == "stopped":
        print(f"stopped after step {outcome.step} (--stop-at); continue with 'tinygraft finetune --out {ns.out} "
              "--resume'", file=sys.stderr)  # fmt: skip
    r = outcome.results
    keys = ("metric", "metrics", "best_step", "train_seconds", "tokens_per_s", "trainable_params", "total_params")
    print(json.dumps({k: r.get(k) for k in keys}))
    return 0


def cmd_predict(ns) -> int:
    from tinygraft.train.predict import predict_command

    return predict_command(ns)


def cmd_compare(ns) -> int:
    from tinygraft.train.compare import compare_command

    return compare_command(ns)


def add_finetune_commands(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model on a labeled task")
    add_finetune_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="predictions of a fine-tuned run on a file or stdin (JSONL out)")
    p.add_argument("run", help="a fine-tuned run directory (or a checkpoint directory)")
    p.add_argument("--input", help="TSV/CSV/JSONL with the run's columns, or text lines (default: stdin)")
    p.add_argument("--output", help="write JSONL here (default: stdout)")
    p.add_argument("--checkpoint", choices=("latest", "best"), help="default: the one results.json kept")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64, help="instruct: tokens to generate")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="several fine-tuning methods on one task: the transfer-learning table")
    add_finetune_flags(p, compare=True)
    p.add_argument("--methods", default="full,linear-probe,top-2,gradual-unfreeze,lora",
                   help="comma-separated methods")  # fmt: skip
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every method runs with each")
    p.add_argument("--lr-for", action="append", default=[], metavar="METHOD=LR", help="per-method lr (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's choice)")
    p.set_defaults(func=cmd_compare)
