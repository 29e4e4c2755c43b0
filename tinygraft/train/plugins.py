"""Tasks and methods from the user's own modules: `TINYGRAFT_PLUGINS=mymodule[,other]` imports them before the
command line is read, so their `register(...)` lines run and their flags appear.

`compare` runs each method in a process of its own; it hands the children the modules every registered task and
method not of tinygraft came from (and the directories they import from), so a task or method registered in a
script or a test file alone works there too.
"""

import importlib
import os
import sys
from pathlib import Path

from tinygraft.errors import TinygraftError
from tinygraft.tasks import TASKS
from tinygraft.train.methods import METHODS

ENV = "TINYGRAFT_PLUGINS"


def load_plugins() -> None:
    for name in (n.strip() for n in os.environ.get(ENV, "").split(",")):
        if name:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise TinygraftError(f"{ENV} names {name!r}, which does not import ({e})") from None


def plugin_modules() -> list[str]:
    """Modules (not tinygraft's) that registered a task or a method, in registration order."""
    found = [type(t).__module__ for t in TASKS.values()] + [c.__module__ for c in METHODS.values()]
    # (a script run as __main__ cannot be imported by name: its registrations stay in its own process)
    return list(dict.fromkeys(m for m in found if m.split(".")[0] not in ("tinygraft", "__main__")))


def child_env(env: dict) -> dict:
    """`env` for a child process that must know this process's plugins (and find them on its path)."""
    modules = plugin_modules()
    if not modules:
        return env
    roots = []
    for name in modules:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:  # the directory the top-level package (or module) is imported from
            roots.append(str(Path(file).resolve().parents[len(name.split(".")) - 1]))
    env = dict(env)
    env[ENV] = ",".join(dict.fromkeys([*modules, *filter(None, env.get(ENV, "").split(","))]))
    paths = [*roots, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env
