"""The fine-tuning tasks, one file each, and their one registry.

A new task is a file with a `Task` subclass (tasks/base.py says what it fills in) and one `register(...)` line,
here or in the user's own module (`TINYGRAFT_PLUGINS=mymodule tinygraft finetune --task mine ...`). The
pre-training objectives (causal and masked LM) are in tasks/lm.py.
"""

import dataclasses

from tinygraft.core.config import flag_name, settings_of
from tinygraft.data.labeled import LabelMap
from tinygraft.errors import TinygraftError
from tinygraft.tasks.base import DataSettings, NoSettings, Scorer, Task
from tinygraft.tasks.classify import Classify
from tinygraft.tasks.instruct import Instruct
from tinygraft.tasks.qa import QA
from tinygraft.tasks.similarity import Similarity
from tinygraft.tasks.tokens import Tokens

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add `task` under its name; registering the same class again (a module imported twice) is a no-op."""
    known = TASKS.get(task.name)
    if known is not None and type(known) is not type(task):
        raise TinygraftError(f"task {task.name!r} is registered twice ({type(known).__name__}, {type(task).__name__})")
    TASKS.setdefault(task.name, task)
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TinygraftError(
            f"unknown task {name!r} (known: {', '.join(TASKS)}; a task of your own module needs TINYGRAFT_PLUGINS)"
        )
    return TASKS[name]


def settings_for(name: str, given) -> object:
    """Task `name`'s settings dataclass from a dict of given values; a flag of another task is named as such."""
    task = get_task(name)
    return settings_of(task.Settings, given, f"--task {name}", "task_settings", flag_of)


def flag_of(key: str) -> str | None:
    for task in TASKS.values():
        for f in dataclasses.fields(task.Settings):
            if f.name == key:
                return flag_name(f)
    return None


def make_head(name: str, backbone, *, num_labels: int | None = None, label_map=None, shipped_pooling=None, **settings):
    """Task `name`'s head over `backbone`, its settings as keywords ("pooling", "problem", "dropout", ...); the label
    names default to "0" .. "num_labels - 1"."""
    if label_map is None and num_labels is not None:
        label_map = LabelMap([str(i) for i in range(num_labels)])
    return get_task(name).make_head(backbone, settings_for(name, settings), label_map, shipped_pooling)


register(Classify())
register(Tokens())
register(QA())
register(Similarity())
register(Instruct())

__all__ = ["TASKS", "DataSettings", "NoSettings", "Scorer", "Task", "get_task", "make_head", "register", "settings_for"]
