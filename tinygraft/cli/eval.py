"""`tinygraft eval`: validation loss and perplexity of a checkpoint (infer/evaluate.py)."""

from tinygraft.cli.common import checkpoint_args
from tinygraft.infer.evaluate import evaluate


def add(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    checkpoint_args(p, "a pre-training run (or its checkpoints/ or a step directory), or a language model directory")
    p.add_argument("--data", help="corpus to score (default: the run's validation split)")
    p.add_argument("--batches", type=int, help="at most this many batches")
    p.set_defaults(func=run)


def run(ns) -> int:
    result = evaluate(ns.run, data=ns.data, max_batches=ns.batches, device=ns.device, which=ns.checkpoint)
    step = f"step {result['step']}" if result["step"] is not None else "pretrained"
    print(
        f"{step}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} on {result['tokens']:,} tokens "
        f"of {result['source']}"
    )
    return 0
