"""`tinygraft info PATH`: what a run, a checkpoint, a Hugging Face directory or `minilm` holds (analysis/info.py)."""

import json

from tinygraft.analysis.info import format_info, info
from tinygraft.cli.common import checkpoint_args, revision_arg


def add(sub) -> None:
    p = sub.add_parser("info", help="what a run, checkpoint, Hugging Face directory or 'minilm' holds")
    checkpoint_args(p, "a run, its checkpoints/ or a step directory, a Hugging Face directory or hub cache entry "
                    "(hf:ORG/NAME), or 'minilm'")  # fmt: skip
    revision_arg(p, "run", "PATH")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(ns) -> int:
    d = info(ns.run, which=ns.checkpoint)
    print(json.dumps(d, indent=2) if ns.json else format_info(d))
    return 0
