"""`tinygraft forgetting RUN [RUN ...]`: continued runs' forgetting side by side (analysis/forgetting.py)."""

import sys

from tinygraft.analysis import forgetting
from tinygraft.analysis.outputs import output_paths, to_json, write_outputs
from tinygraft.cli.common import report_args


def add(sub) -> None:
    p = sub.add_parser("forgetting", help="what continued runs learned on their domain and lost on the texts watched")
    p.add_argument("runs", nargs="+", metavar="RUN", help="runs trained with --watch (or --replay)")
    report_args(p, "forgetting", "each domain's loss over the steps")
    p.set_defaults(func=run)


def run(ns) -> int:
    paths = output_paths(ns.out, ns.png, "forgetting", ns.overwrite)
    rep = forgetting.report(ns.runs)
    if paths is not None:
        write_outputs(paths, rep, forgetting.figure(rep))
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    sys.stdout.write(to_json(rep) if ns.json else forgetting.markdown(rep))
    return 0
