"""`tinygraft distill`: train a student from a teacher. A fine-tuned teacher makes it a fine-tuning run of the
teacher's task (the `finetune` flags, the student in place of --from); a language model teacher a pre-training
run on --data (--steps, --seed, --batch-size, --lr, --max-length, --device, --keep, --method and its settings of the
flags below). See train/distill.py."""

import json
import sys

from tinygraft.cli import finetune as finetune_cli
from tinygraft.cli.common import INTERRUPTED
from tinygraft.cli.flags import add_settings, given
from tinygraft.errors import TinygraftError
from tinygraft.models.pretrained import record_name, resolve_pretrained
from tinygraft.train import distill, runs
from tinygraft.train.config import DistillSettings
from tinygraft.train.finetune import FinetuneArgs, finetune
from tinygraft.train.pretrain import PretrainArgs, pretrain

PREFIX = "distill."
# The schedule flags a language-model distillation takes, as pre-training's settings.
LM_FLAGS = {
    "train.steps": "steps",
    "train.seed": "seed",
    "train.device": "device",
    "train.keep": "keep",
    "train.precision": "precision",
    "train.fsdp": "fsdp",
}
LM_SETS = {"train.batch_size", "train.lr", "data.max_length", "train.tensorboard"}


def add(sub) -> None:
    p = sub.add_parser("distill", help="train a smaller student to mimic a teacher (soft labels, hidden states)")
    add_settings(p, DistillSettings, PREFIX, title="distillation")
    p.add_argument("--data", help="with a language-model teacher: the corpus (default: pydoc_data.topics)")
    finetune_cli.add_finetune_flags(p, skip=("source",))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step (leaves a checkpoint to --resume)")
    p.set_defaults(func=run)


def _recorded(spec: str) -> str:
    """A teacher or student as the run records it: a preset or the shipped MiniLM by name, a path absolute."""
    if distill.is_preset(spec):
        return spec
    path = resolve_pretrained(spec)
    return record_name(path) if path.exists() else spec


def run(ns) -> int:
    flags = given(ns)
    if ns.resume:
        kind = runs.locate_spec(ns.out)[0]
    else:
        if flags.get(PREFIX + "teacher") is None:
            raise TinygraftError("distill needs --teacher RUN_OR_DIR (a fine-tuned run, or a language model)")
        distill.check_choice(DistillSettings(**{k[len(PREFIX) :]: v for k, v in flags.items() if k.startswith(PREFIX)}))
        for key in ("teacher", "student"):
            if flags.get(PREFIX + key) is not None:
                flags[PREFIX + key] = _recorded(flags[PREFIX + key])
        kind = distill.teacher_kind(flags[PREFIX + "teacher"])
    outcome = _task(ns, flags) if kind == "finetune" else _lm(ns, flags)
    if outcome.status == "interrupted":
        print(f"interrupted: saved step {outcome.step} in {ns.out}/checkpoints; continue with "
              f"'tinygraft distill --out {ns.out} --resume'", file=sys.stderr)  # fmt: skip
        return INTERRUPTED
    if outcome.status == "stopped":
        print(f"stopped after step {outcome.step} (--stop-at); continue with 'tinygraft distill --out {ns.out} "
              "--resume'", file=sys.stderr)  # fmt: skip
    r = outcome.results
    keys = ("metric", "metrics", "best_step", "train_seconds", "total_params")
    print(json.dumps({**{k: r.get(k) for k in keys}, "teacher_metrics": r.get("distill", {}).get("teacher_metrics")}))
    return 0


def _task(ns, flags: dict):
    if ns.data is not None:
        raise TinygraftError("--data is the corpus of a language-model teacher; a fine-tuned teacher reads --train")
    if not ns.resume:
        teacher = runs.load(flags[PREFIX + "teacher"])
        flags.setdefault("task", teacher.finetune.task)
        student = flags.get(PREFIX + "student")
        flags["source"] = student if student is not None else flags[PREFIX + "teacher"]
    args = FinetuneArgs(out=ns.out, flags=flags, config=ns.config, sets=ns.sets, overwrite=ns.overwrite,
                        resume=ns.resume, stop_at=ns.stop_at)  # fmt: skip
    return finetune(args)


def _lm(ns, flags: dict):
    settings = {k[len(PREFIX) :]: v for k, v in flags.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in flags.items() if not k.startswith(PREFIX)}
    sets = list(ns.sets or [])
    method_settings = {k.split(".", 1)[1]: v for k, v in rest.items() if k.startswith("method_settings.")}
    for key in sorted(rest):
        if key in LM_FLAGS or key == "method" or key.startswith("method_settings."):
            continue
        if key in LM_SETS:
            sets.insert(0, f"{key.replace('data.max_length', 'train.seq_len')}={rest[key]}")
            continue
        raise TinygraftError(
            f"--{key.split('.')[-1].replace('_', '-')} applies to distilling a fine-tuned teacher; a language-model "
            "teacher takes --data, --steps, --seed, --batch-size, --lr, --max-length, --device, --precision, --keep, "
            "--method, --tensorboard, --set"
        )
    student = settings.get("student")
    preset = student if distill.is_preset(student) else None
    args = PretrainArgs(
        out=ns.out, preset=preset, config=ns.config, data=ns.data, stop_at=ns.stop_at, resume=ns.resume,
        overwrite=ns.overwrite, sets=sets, from_=student if student is not None and preset is None else None,
        distill=settings, method=rest.get("method"), method_settings=method_settings,
        **{name: rest.get(key) for key, name in LM_FLAGS.items()},
    )  # fmt: skip
    return pretrain(args)
