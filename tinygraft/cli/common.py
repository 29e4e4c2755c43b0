"""Flags several commands share."""

from tinygraft.errors import TinygraftError
from tinygraft.models import hub

INTERRUPTED = 130  # the shell's code for "ended by SIGINT"
REVISION_OF = "_revision_of"  # the parser defaults key naming the dest (and the flag) --revision qualifies


def checkpoint_args(p, what="a run directory, its checkpoints/ directory, or one step directory", default="latest"):
    p.add_argument("run", help=what)
    p.add_argument(
        "--checkpoint",
        choices=("latest", "best"),
        default=default,
        help="which pointer to follow" + (" (default: the one results.json kept)" if default is None else ""),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def config_args(p, sections: str) -> None:
    p.add_argument("--config", help=f"a TOML file of settings (sections {sections})")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="KEY=VALUE",
        help="any setting, e.g. train.lr=1e-3 (repeatable; beats the flags and --config)",
    )


def adapter_name_arg(p) -> None:
    """--adapter-name, for the commands that read a run trained with several adapters (finetune --train NAME=FILE)."""
    p.add_argument("--adapter-name", metavar="NAME", help="which adapter of a run trained with --train NAME=FILE ... "
                   "(tinygraft info RUN lists them)")  # fmt: skip


def report_args(p, name: str, chart: str) -> None:
    """--json, --out DIR | --png PATH and --overwrite: the flags of the commands that write a report and its chart
    (analysis/outputs.py)."""
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help=f"write DIR/{name}.json and DIR/{name}.png ({chart})")
    where.add_argument("--png", metavar="PATH", help=f"write the {chart} to PATH and the JSON beside it (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace files already there")


def revision_arg(p, dest: str, flag: str) -> None:
    """--revision REV for the spec in `dest` (`flag` is how messages call it); main() folds it into that spec."""
    p.add_argument("--revision", metavar="REV", help=f"with {flag} a Hugging Face hub cache entry (hf:ORG/NAME or a "
                   "models--ORG--NAME directory): a branch, tag or commit hash (default: main)")  # fmt: skip
    p.set_defaults(**{REVISION_OF: (dest, flag)})


def apply_revision(ns) -> None:
    """Fold --revision into the spec it qualifies ('hf:ORG/NAME@REV', or an entry's snapshot directory), so every
    loader downstream, and what a run records, sees one string."""
    revision = getattr(ns, "revision", None)
    if revision is None or not hasattr(ns, REVISION_OF):
        return
    dest, flag = getattr(ns, REVISION_OF)
    spec = getattr(ns, dest, None)
    if spec is None:
        raise TinygraftError(f"--revision {revision!r} picks a revision of {flag} hf:ORG/NAME, and no {flag} was given")
    setattr(ns, dest, hub.with_revision(spec, revision))
