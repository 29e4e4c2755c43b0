"""`tinygraft predict RUN`: a fine-tuned run's predictions on a file or stdin, JSON Lines out (infer/predict.py)."""

from pathlib import Path

from tinygraft.cli.common import adapter_name_arg
from tinygraft.errors import TinygraftError
from tinygraft.infer.predict import predict, write_rows
from tinygraft.tasks.base import READINGS
from tinygraft.train import runs
from tinygraft.train.loop import resolve_device


def add(sub) -> None:
    p = sub.add_parser("predict", help="predictions of a fine-tuned run on a file or stdin (JSONL out)")
    p.add_argument("run", help="a fine-tuned run directory (or a checkpoint directory)")
    p.add_argument(
        "--input",
        help="a file in the run's training shape (a table with its columns, CoNLL, JSONL, "
        "SQuAD JSON) or text lines (default: stdin)",
    )
    p.add_argument("--input-format", choices=list(READINGS), help="force a reading of --input (default: by its shape)")
    p.add_argument("--output", help="write JSONL here (default: stdout)")
    p.add_argument("--checkpoint", choices=("latest", "best"), help="default: the one results.json kept")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64, help="instruct: tokens to generate")
    p.add_argument("--device", default="auto")
    adapter_name_arg(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(ns) -> int:
    if ns.output not in (None, "-") and Path(ns.output).exists() and not ns.overwrite:
        raise TinygraftError(f"output '{ns.output}' already exists; pass --overwrite to replace it")
    if ns.batch_size < 1 or ns.max_new_tokens < 1:
        raise TinygraftError("--batch-size and --max-new-tokens must be at least 1")
    loaded = runs.load(ns.run, ns.checkpoint, device=resolve_device(ns.device), adapter=ns.adapter_name)
    rows = predict(loaded, ns.input, ns.input_format, ns.batch_size, ns.max_new_tokens)
    write_rows(rows, ns.output, ns.overwrite)
    return 0
