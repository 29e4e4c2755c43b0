"""Command-line flags generated from settings dataclasses, so a default and its help are written once, on the field.

    add_settings(parser, FinetuneTrain, "train.")   --epochs, --batch-size, ... with dest "train.epochs", ...
    given(ns)                                       {"train.epochs": 5, ...}: only the flags the user gave

The rules (core/config.py: `setting`): the flag is the field's name with dashes (or the `flag=` it names); a
boolean defaulting to False is `--flag`, one defaulting to True is `--no-flag`; a Literal becomes choices. A flag
shared by several methods or tasks (`--pooling`, `--layer-lr-decay`) is one flag: the fields must agree on its
type, default and help, which `add_settings` checks.
"""

import argparse
import dataclasses
import types
import typing
from typing import Literal, Union, get_args, get_origin

from tinygraft.core.config import flag_name

GIVEN = "_settings_dests"  # the parser defaults key that lists the dests of generated flags


def _scalar(tp):
    """(python type, choices) of an annotation: Optional[X] -> X; Literal[...] -> (str, choices)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        return type(choices[0]), list(choices)
    return tp, None


class _Repeatable(argparse.Action):
    """A flag given once keeps its value; given again, the values gather into a list (--train a=x --train b=y)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, self.dest, None)  # absent until given: the generated flags default to SUPPRESS
        if seen is None:
            setattr(namespace, self.dest, values)
        else:
            setattr(namespace, self.dest, [*(seen if isinstance(seen, list) else [seen]), values])


def _signature(f: dataclasses.Field, tp) -> tuple:
    return (tp, f.default, f.metadata.get("help"))


def add_settings(parser, cls: type, prefix: str, skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """A flag for every `setting` field of `cls` (dest = prefix + field name); flags already on `parser` are shared."""
    hints = typing.get_type_hints(cls)
    seen: dict = parser._tinygraft_flags if hasattr(parser, "_tinygraft_flags") else {}
    parser._tinygraft_flags = seen
    group = parser.add_argument_group(title) if title else parser
    dests = parser.get_default(GIVEN) or []
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag, dest = "--" + flag_name(f), prefix + f.name
        sig = _signature(f, hints[f.name])
        if flag in seen:
            if seen[flag] != (dest, sig):
                raise TypeError(f"{flag} is declared twice with different meanings: {seen[flag]} and {(dest, sig)}")
            continue
        seen[flag] = (dest, sig)
        tp, choices = _scalar(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" (default: {default})" if default is not None and not isinstance(default, bool) else ""
        if tp is bool:
            if default is True:
                group.add_argument(
                    "--no-" + flag[2:],
                    dest=dest,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f.metadata["help"] + " (on by default; this turns it off)",
                )
            else:
                group.add_argument(
                    flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"]
                )
        else:
            metavar = None if choices else flag[2:].upper().replace("-", "_")
            group.add_argument(
                flag,
                dest=dest,
                action=_Repeatable if f.metadata.get("repeat") else "store",
                type=tp,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=f.metadata["help"] + shown,
            )
        dests.append(dest)
    parser.set_defaults(**{GIVEN: dests})


def given(ns: argparse.Namespace) -> dict:
    """{dest: value} of the generated flags the user gave (absent ones are not in the namespace at all)."""
    values = vars(ns)
    return {d: values[d] for d in values.get(GIVEN, []) if d in values}
