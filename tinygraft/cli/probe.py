"""`tinygraft probe MODEL --train FILE --val FILE`: a linear probe on every layer's frozen features
(analysis/probe.py); the data flags are finetune's."""

import sys

from tinygraft.analysis.outputs import output_paths, to_json, write_outputs
from tinygraft.analysis.probe import TASKS, accuracy_plot, format_table, probe
from tinygraft.cli.cka import MODEL_HELP, shared_args
from tinygraft.cli.flags import add_settings, given
from tinygraft.tasks.base import DataSettings
from tinygraft.train.loop import resolve_device


def add(sub) -> None:
    p = sub.add_parser("probe", help="a linear probe per layer on frozen features: what each layer holds")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--task", choices=TASKS, default="classify", help="a label per text, or a tag per word")
    p.add_argument("--train", required=True, help="labelled training data, as finetune reads it (TSV/CSV/JSONL, CoNLL)")
    p.add_argument("--val", required=True, help="labelled validation data, read the same way")
    add_settings(p, DataSettings, "data.", skip=("train", "val"), title="data (finetune's flags)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty on the probe's weights (default: 1e-3)")
    p.add_argument("--steps", type=int, default=100, help="L-BFGS iterations per probe (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="draws the control task's labels (--task tokens)")
    shared_args(p, "probe", "accuracy-by-depth chart")
    p.set_defaults(func=run)


def run(ns) -> int:
    paths = output_paths(ns.out, ns.png, "probe", ns.overwrite)
    flags = {k.removeprefix("data."): v for k, v in given(ns).items()}
    data = DataSettings(train=ns.train, val=ns.val, **flags)
    report = probe(
        ns.model,
        ns.task,
        data,
        resolve_device(ns.device),
        batch_size=ns.batch_size,
        weight_decay=ns.weight_decay,
        steps=ns.steps,
        seed=ns.seed,
    )
    if paths is not None:
        write_outputs(paths, report, accuracy_plot(report))
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    sys.stdout.write(to_json(report) if ns.json else format_table(report) + "\n")
    return 0
