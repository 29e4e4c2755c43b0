"""`tinygraft finetune`: a pretrained model + a task head on labeled data; the flags come from the settings of the
job (train/config.py: FinetuneConfig), of every task (tinygraft/tasks/) and of every method (train/methods/)."""

import json
import sys

from tinygraft.cli.common import INTERRUPTED, config_args, revision_arg
from tinygraft.cli.flags import add_settings, given
from tinygraft.tasks import TASKS
from tinygraft.tasks.base import DataSettings
from tinygraft.train import methods
from tinygraft.train.config import FinetuneConfig, FinetuneContinual, FinetuneTrain
from tinygraft.train.finetune import FinetuneArgs, finetune


def add_finetune_flags(p, compare: bool = False, skip: tuple[str, ...] = (), out: str | None = None) -> None:
    """The flags `finetune`, `compare`, `advise` and `distill` share (compare and advise take no --method and --seed;
    distill takes --student instead of --from: `skip`); `out`: a default --out (advise's), else it is required."""
    add_settings(p, FinetuneConfig, "", skip=(*skip, "method") if compare else skip)
    if "source" not in skip:
        revision_arg(p, "source", "--from")
    add_settings(p, DataSettings, "data.", title="data")
    add_settings(p, FinetuneTrain, "train.", skip=("seed",) if compare else (), title="schedule")
    for task in TASKS.values():
        add_settings(p, task.Settings, "task_settings.", title=f"--task {task.name}: {task.summary}")
    for name in methods.names_for("finetune"):
        cls = methods.METHODS[name]
        add_settings(p, cls.Settings, "method_settings.", title=f"--method {name}: {cls.summary}")
    config_args(p, "data, train, task_settings, method_settings; a run's config.json 'finetune' section too")
    if out is not None:
        p.add_argument("--out", default=out, help=f"the directory of advise's measuring runs (default: {out})")
    else:
        p.add_argument(
            "--out", required=True, help="run directory" + (" holding one run per method and seed" if compare else "")
        )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def add(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model on a labeled task")
    add_finetune_flags(p)
    add_settings(p, FinetuneContinual, "continual.", title="adapting first, and watching for forgetting")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (its own saved settings; --device may change)",
    )
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step (leaves a checkpoint to --resume)")
    p.set_defaults(func=run)


def run(ns) -> int:
    args = FinetuneArgs(
        out=ns.out,
        flags=given(ns),
        config=ns.config,
        sets=ns.sets,
        overwrite=ns.overwrite,
        resume=ns.resume,
        stop_at=ns.stop_at,
    )
    outcome = finetune(args)
    if outcome.status == "interrupted":
        print(
            f"interrupted: saved step {outcome.step} in {ns.out}/checkpoints; continue with "
            f"'tinygraft finetune --out {ns.out} --resume'",
            file=sys.stderr,
        )
        return INTERRUPTED
    if outcome.status == "stopped":
        print(
            f"stopped after step {outcome.step} (--stop-at); continue with 'tinygraft finetune --out {ns.out} "
            "--resume'",
            file=sys.stderr,
        )
    r = outcome.results
    keys = ("metric", "metrics", "best_step", "train_seconds", "tokens_per_s", "trainable_params", "total_params")
    print(json.dumps({k: r.get(k) for k in keys}))
    return 0
