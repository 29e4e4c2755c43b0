"""`tinygraft cka A B --data FILE`: CKA and SVCCA between every layer of two checkpoints (analysis/similarity.py)."""

import sys

from tinygraft.analysis.outputs import output_paths, to_json, write_outputs
from tinygraft.analysis.similarity import compare_layers, format_table, heatmap
from tinygraft.cli.common import report_args
from tinygraft.train.loop import resolve_device

MODEL_HELP = "a run, a checkpoint, a pretrained directory or 'minilm'"


def shared_args(p, name: str, chart: str) -> None:
    """--json, --out | --png, --overwrite and --device: the flags `probe` shares."""
    report_args(p, name, chart)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def add(sub) -> None:
    p = sub.add_parser("cka", help="how alike two checkpoints' layers are: CKA (debiased and biased) and SVCCA")
    p.add_argument("a", help=MODEL_HELP)
    p.add_argument("b", help=MODEL_HELP + " (the same family and tokenizer as A; depth and width may differ)")
    p.add_argument("--data", required=True, help="the texts: one per line, or JSONL with a 'text' field")
    p.add_argument("--tokens", action="store_true", help="a row per real token (default: a row per text, pooled)")
    p.add_argument("--max-texts", type=int, metavar="N", help="read the first N texts")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--max-len", type=int, metavar="N", help="tokens per text (default: the checkpoints' own limit)")
    p.add_argument("--svcca-keep", type=float, default=0.99, help="variance SVCCA keeps of each side (default: 0.99)")
    shared_args(p, "cka", "layer x layer heatmap")
    p.set_defaults(func=run)


def run(ns) -> int:
    paths = output_paths(ns.out, ns.png, "cka", ns.overwrite)
    report = compare_layers(
        ns.a,
        ns.b,
        ns.data,
        resolve_device(ns.device),
        ns.tokens,
        ns.max_texts,
        ns.batch_size,
        ns.max_len,
        ns.svcca_keep,
    )
    if paths is not None:
        write_outputs(paths, report, heatmap(report))
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    sys.stdout.write(to_json(report) if ns.json else format_table(report) + "\n")
    return 0
