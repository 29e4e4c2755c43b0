"""`tinygraft compare`: several fine-tuning methods on one task, the transfer-learning table (train/compare.py)."""

import sys
from pathlib import Path

from tinygraft.cli.common import INTERRUPTED
from tinygraft.cli.finetune import add_finetune_flags
from tinygraft.cli.flags import given
from tinygraft.core.config import load_config_file
from tinygraft.errors import TinygraftError
from tinygraft.train.compare import compare, markdown, parse_list, parse_lr_for
from tinygraft.train.config import resolve_finetune
from tinygraft.train.finetune import normalized_flags

PREFIX = "method_settings."


def add(sub) -> None:
    p = sub.add_parser("compare", help="several fine-tuning methods on one task: the transfer-learning table")
    add_finetune_flags(p, compare=True)
    p.add_argument("--methods", default="full,linear-probe,top-2,gradual-unfreeze,lora", help="comma-separated methods")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every method runs with each")
    p.add_argument("--lr-for", action="append", default=[], metavar="METHOD=LR", help="per-method lr (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's choice)")
    p.set_defaults(func=run)


def settings_of(ns, command: str) -> tuple:
    """(the job's settings, the method settings given): compare and advise run several methods, so the method flags
    are kept apart and handed to each method that takes them."""
    if any(s.split("=", 1)[0].strip().startswith(PREFIX) for s in ns.sets or []):
        raise TinygraftError(
            f"{command} takes method settings as flags (--lora-r 4) or in --config's [method_settings]"
        )
    file = load_config_file(ns.config) if ns.config else {}
    flags = normalized_flags(given(ns), Path(ns.out))
    method_settings = {
        **(file.pop("method_settings", None) or {}),
        **{k[len(PREFIX) :]: v for k, v in flags.items() if k.startswith(PREFIX)},
    }
    flags = {k: v for k, v in flags.items() if not k.startswith(PREFIX)}
    return resolve_finetune(None, file, flags, ns.sets), method_settings


def run(ns) -> int:
    names = parse_list(ns.methods, "methods")
    try:
        seeds = [int(s) for s in parse_list(ns.seeds, "seeds")]
    except ValueError:
        raise TinygraftError(f"--seeds {ns.seeds!r} must be comma-separated integers") from None
    cfg, method_settings = settings_of(ns, "compare")
    lr_for = parse_lr_for(ns.lr_for)
    try:
        report = compare(cfg, ns.out, names, seeds, lr_for, method_settings, ns.threads, ns.overwrite)
    except KeyboardInterrupt:
        print(
            f"interrupted: the runs so far are in {ns.out}; the same compare command goes on from there",
            file=sys.stderr,
        )
        return INTERRUPTED
    print(markdown(report["rows"], report["title"]))
    print(f"wrote {Path(ns.out) / 'compare.md'}, compare.json and compare.png", file=sys.stderr)
    return 0
