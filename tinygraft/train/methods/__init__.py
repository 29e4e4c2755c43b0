"""The training methods, one file each, and their one registry.

A new method is a file with a `Method` subclass (methods/base.py says what it fills in: the loop's hooks, its
`Settings` dataclass, the jobs it applies to, its default learning rate) and one `register(...)` line, here or in
the user's own module (`TINYGRAFT_PLUGINS=mymodule tinygraft finetune --method mine ...`). The command-line flags of
`pretrain`, `finetune` and `compare` are generated from the registered methods' settings (tinygraft/cli/flags.py).
"""

import dataclasses

from tinygraft.core.config import flag_name, settings_of
from tinygraft.errors import TinygraftError
from tinygraft.train.methods.adapter import AdapterMethod
from tinygraft.train.methods.base import Method, tied_aliases, trainable_summary
from tinygraft.train.methods.bottleneck import Houlsby, Pfeiffer
from tinygraft.train.methods.freezing import Full, GradualUnfreeze, LinearProbe, TopK, units
from tinygraft.train.methods.ia3 import IA3Method
from tinygraft.train.methods.lora import DoRAMethod, LoRAMethod
from tinygraft.train.methods.noshot import FewShot, ZeroShot
from tinygraft.train.methods.prompt import PrefixTuning, PromptTuning

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class under its name (usable as a decorator); the same class again is a no-op."""
    known = METHODS.get(cls.name)
    if known is not None and known is not cls:
        raise TinygraftError(f"method {cls.name!r} is registered twice ({known.__name__}, {cls.__name__})")
    METHODS[cls.name] = cls
    return cls


def lookup(name: str, job: str | None = None) -> tuple[type[Method], dict]:
    """(the method class, the settings its name implies) for a name ('top-2' -> TopK, {'top_k': 2})."""
    for cls in METHODS.values():
        implied = cls.settings_from_name(name)
        if implied is not None:
            if job is not None and job not in cls.jobs:
                names = ", ".join(n for n, c in METHODS.items() if job in c.jobs)
                raise TinygraftError(f"{job} trains with --method {names}, not {name!r}")
            return cls, implied
    names = ", ".join(n for n, c in METHODS.items() if job is None or job in c.jobs)
    raise TinygraftError(
        f"unknown method {name!r}; known: {names} (top-k also as top-K, e.g. top-2; few-shot as few-shot-K)"
    )


def names_for(job: str) -> list[str]:
    return [n for n, c in METHODS.items() if job in c.jobs]


def settings_for(name: str, given: dict | None = None, job: str | None = None):
    """The settings dataclass of method `name` from a dict of given values (a config's `method_settings`), the
    name's implied settings applied; a value the name contradicts (top-2 with top_k=3) is an error."""
    cls, implied = lookup(name, job)
    given = dict(given or {})
    for key, value in implied.items():
        if key in given and given[key] != value:
            raise TinygraftError(f"--method {name} means {key}={value}, but {key}={given[key]} was given too")
        given[key] = value
    return settings_of(cls.Settings, given, f"--method {name}", "method_settings", flag_of)


def flag_of(key: str) -> str | None:
    """The flag of a settings field, whichever registered method declares it."""
    for cls in METHODS.values():
        for f in dataclasses.fields(cls.Settings):
            if f.name == key:
                return flag_name(f)
    return None


def make_method(name: str, settings=None, job: str | None = None) -> Method:
    """A method object by name, with its settings (a dataclass instance, a dict, or None for the defaults)."""
    cls, _ = lookup(name, job)
    if settings is None or isinstance(settings, dict):
        settings = settings_for(name, settings, job)
    return cls(settings)


def default_lr(name: str) -> float:
    cls, _ = lookup(name)
    if cls.default_lr is None:
        raise TinygraftError(f"method {name!r} names no default learning rate; give --lr")
    return cls.default_lr


register(Full)
register(LinearProbe)
register(TopK)
register(GradualUnfreeze)
register(LoRAMethod)
register(DoRAMethod)
register(IA3Method)
register(Houlsby)
register(Pfeiffer)
register(PromptTuning)
register(PrefixTuning)
register(ZeroShot)
register(FewShot)

__all__ = [
    "METHODS",
    "AdapterMethod",
    "Method",
    "default_lr",
    "lookup",
    "make_method",
    "register",
    "tied_aliases",
    "trainable_summary",
    "units",
]
