"""`train.tensorboard=true`: metrics.jsonl's rows mirrored as TensorBoard scalars in RUN/tensorboard/.

metrics.jsonl stays the record; the event files are a view of it, so each process start rebuilds them from it:
the old event files are removed, and one new file receives the run's config as text, then every row
metrics.jsonl holds (on a resume, already cut back to the checkpoint's step), then each row as it is logged.
Keeping the old files and skipping steps already written would not do: a run that crashed after logging step 30
but before checkpointing it resumes at step 20 and logs 21..30 again, with other timings, and the old file holds
the first 21..30 and possibly a record cut short by the crash. Rebuilt, every step is in the files once, with the
values metrics.jsonl holds, and whatever a crash leaves half-done the next start repairs. The new file opens with
TensorBoard's purge marker (SessionLog START at step 0), so a TensorBoard already watching the directory drops what
it had read from the removed files instead of showing those steps twice.

The scalars are TensorBoard's usual float32 ones (tag `split/key`, the step as global_step); the replayed rows get
the wall time of the rebuild, since metrics.jsonl records only `elapsed_s`.
"""

import json
import os
from pathlib import Path

from tinygraft.errors import TinygraftError

DIR = "tensorboard"
MISSING = "train.tensorboard=true needs the tensorboard package; install it with pip install 'tinygraft[tensorboard]'"


def _writer_class():
    try:
        # imported only when a run asks for TensorBoard: it is an optional extra, and slow to import
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError:  # tensorboard absent (torch's module imports it) or too old for torch
        raise TinygraftError(MISSING) from None
    return SummaryWriter


def require(on: bool) -> None:
    """Refuse a run that asks for TensorBoard without it, before anything is loaded or written."""
    if on:
        _writer_class()


def scalars(row: dict) -> list[tuple[str, float]]:
    """(tag, value) for every number in a metrics.jsonl row besides its step."""
    split = row.get("split", "train")
    return [
        (f"{split}/{key}", float(value))
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


class Board:
    """The one event file this process writes in `run_path`/tensorboard/."""

    def __init__(self, run_path: Path, config: dict, rows: list[dict], step: int):
        writer_class = _writer_class()
        where = Path(run_path) / DIR
        if where.is_dir():
            for old in where.iterdir():
                if old.is_file() and "tfevents" in old.name:
                    old.unlink()
        # SummaryWriter names the file by the second, host, pid and a counter; in a container every start may get
        # the same pid, so a random suffix keeps two starts within one second from sharing (truncating) a file.
        self.writer = writer_class(str(where), purge_step=0, flush_secs=10, filename_suffix=f".{os.urandom(4).hex()}")
        shown = "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())  # a markdown code block
        self.writer.add_text("config", shown, global_step=step)
        for row in rows:
            self.add(row)

    def add(self, row: dict) -> None:
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()  # flushes: the file is complete however the run ends
