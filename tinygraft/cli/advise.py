"""`tinygraft advise`: which fine-tuning method to use, measured on the user's data and machine (analysis/advise.py
measures, analysis/advice.py decides, analysis/advise_report.py prints)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

from tinygraft.analysis import advise_report as R
from tinygraft.analysis.advise import advise
from tinygraft.cli.compare import PREFIX, settings_of
from tinygraft.cli.finetune import add_finetune_flags
from tinygraft.cli.flags import given
from tinygraft.core.checkpoint import atomic_write

OUT = "runs/advise"
# The settings advise chooses itself, so the commands it prints leave them out of what it was given.
CHOSEN = ("source", "train.lr", "train.epochs", "train.steps")


def add(sub) -> None:
    p = sub.add_parser(
        "advise", help="measure the data, the domain gap and each method's cost here, then recommend a method"
    )
    add_finetune_flags(p, compare=True, out=OUT)
    p.add_argument("--budget-minutes", type=float, metavar="M", help="only methods whose estimated training fits")
    p.add_argument("--reference", metavar="FILE", help="the text the domain gap is measured against (default: the "
                   "default corpus, pydoc_data.topics)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--run", action="store_true", help="then run the recommended `compare` (3 seeds)")
    p.add_argument("--threads", type=int, help="torch threads per measuring run (default: torch's choice)")
    p.set_defaults(func=run, _flag_of={dest: flag for flag, (dest, _) in p._tinygraft_flags.items()})


def shared_argv(ns, flags: dict) -> tuple[list[str], dict[str, list[str]]]:
    """The flags the user gave that the printed commands repeat: (data, task and schedule flags, --config, --set;
    {method setting: its flags}, which a command repeats only for the methods that take them)."""
    flag_of = ns._flag_of
    common: list[str] = []
    per_setting: dict[str, list[str]] = {}
    for dest, value in flags.items():
        if dest in CHOSEN or dest not in flag_of:
            continue
        flag = flag_of[dest]
        if value is True:
            parts = [flag]
        elif value is False:
            parts = ["--no-" + flag[2:]]
        else:
            parts = [x for v in (value if isinstance(value, list) else [value]) for x in (flag, str(v))]
        if dest.startswith(PREFIX):
            per_setting[dest[len(PREFIX) :]] = parts
        else:
            common += parts
    if ns.config:
        common += ["--config", ns.config]
    for s in ns.sets or []:
        common += ["--set", s]
    return common, per_setting


def run(ns) -> int:
    out = Path(ns.out)
    cfg, method_settings = settings_of(ns, "advise")
    raw = given(ns)
    report = advise(cfg, out, ns.reference, ns.budget_minutes, method_settings, ns.threads, ns.overwrite, progress)
    report["commands"] = R.commands(report, *shared_argv(ns, raw), out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "advice.json", json.dumps(report, indent=2) + "\n")
    text = R.format_text(report)
    atomic_write(out / "advice.md", text)
    R.plot(report, out / "advice.png")
    print(json.dumps(report, indent=2) if ns.json else text)
    print(f"wrote {out / 'advice.md'}, advice.json and advice.png", file=sys.stderr)
    if not ns.run:
        return 0
    for name in ("pretrain", "compare"):  # the domain's pre-training first, where advise asked for it
        line = report["commands"].get(name)
        if line is None:
            continue
        progress(f"running: {line}")
        rc = subprocess.run([sys.executable, "-m", "tinygraft", *shlex.split(line)[1:]], check=False).returncode
        if rc != 0:
            return rc
    return 0


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
