"""The run directory: config.json, metrics.jsonl, results.json, loss.png, checkpoints/.

Nothing a user had is lost: a directory that already holds a run is refused unless the run is resumed
(`--resume`) or replaced on purpose (`--overwrite`), and one process at a time works in it: a job holds an OS lock
on the directory (flock) from its first look at it to its end, released however the process ends, so a second
`--resume` or an `--overwrite` of a running run gets one sentence naming the holder's pid (in `.lock`), and a lock
left by a dead process is simply free. Temporary checkpoint directories a dead process left behind are removed
once the lock is held.

With `train.tensorboard=true` every metrics row also goes to RUN/tensorboard/ (train/board.py), through `log`, so
every job that writes metrics.jsonl gets it; the event file is closed (flushed) when the directory is released.

Under torchrun (several processes, one run) rank 0 is the directory's one writer: it locks it, prepares it and
writes every file; the other ranks check what it checks, read what it reads (a checkpoint to resume), and write
nothing (`writer` is False). A barrier after the check keeps rank 0 from starting the run before every rank has
looked at the directory as it was.
"""

import json
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; one process per run directory is then the user's to keep
    fcntl = None

from tinygraft.core import checkpoint, dist
from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.train import board

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
PLOT = "loss.png"
ADAPT_FIRST = "adapt-first"  # `finetune --adapt-first`'s phase: a run of its own inside the run (train/adapt_first.py)
RUN_FILES = (CONFIG, METRICS, RESULTS, "checkpoints", ADAPT_FIRST, board.DIR)
LOCK = ".lock"  # the pid of the process holding the directory (the lock itself is on the directory)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._board: board.Board | None = None
        self.writer = dist.is_main()
        self._checked = False  # every rank has looked at the directory (the barrier in `check`)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):
        self.release()

    def lock(self) -> None:
        """Hold the directory for this process (a no-op when it does not exist yet: prepare() locks it once made)."""
        if self._lock_fd is not None or fcntl is None or not self.path.is_dir() or not self.writer:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TinygraftError(
                f"another tinygraft process{self._holder()} is using the run directory {str(self.path)!r}; wait for it "
                "to end (or stop it) and try again"
            ) from None
        self._lock_fd = fd
        try:
            (self.path / LOCK).write_text(f"{os.getpid()}\n", encoding="utf-8")
        except OSError:
            pass  # a read-only run can still be read; the lock is on the directory, not in this file

    def _holder(self) -> str:
        try:
            pid = int((self.path / LOCK).read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})"

    def release(self) -> None:
        self.close_board()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def clean_stale(self) -> None:
        """Remove the temporary step directories a process that died while saving left in checkpoints/."""
        if self._lock_fd is None or not self.checkpoints.is_dir():
            return
        for leftover in self.checkpoints.iterdir():
            if leftover.is_dir() and leftover.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(leftover, ignore_errors=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse what cannot work, before anything is deleted or written (the directory locked first, if it exists)."""
        self._refuse(resume, overwrite)
        if not self._checked:
            self._checked = True
            dist.barrier()

    def _refuse(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise TinygraftError("--resume and --overwrite contradict each other; choose one")
        if self.path.exists() and not self.path.is_dir():
            raise TinygraftError(f"output path {str(self.path)!r} is a file, not a directory")
        self.lock()
        if resume:
            if not self.holds_run():
                raise TinygraftError(f"nothing to resume: {str(self.path)!r} holds no run")
            return
        if self.holds_run() and not overwrite:
            raise TinygraftError(
                f"output directory {str(self.path)!r} already holds a run; pass --resume to continue it or "
                "--overwrite to replace it"
            )

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Make the directory ready for a new run (or check it holds one to resume); --overwrite deletes the old run."""
        if not self.writer:  # rank 0 prepares; this rank looked at the directory before rank 0 could touch it
            if not self._checked:
                self._checked = True
                dist.barrier()
            return
        self.check(resume=resume, overwrite=overwrite)
        if not resume:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            self._refuse(False, overwrite)  # another process may have started a run here meanwhile
            if self.holds_run():
                for name in (*RUN_FILES, PLOT):
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
        self.clean_stale()

    def write_config(self, config: dict) -> None:
        if not self.writer:
            return
        checkpoint.atomic_write(self.path / CONFIG, json.dumps(config, indent=2) + "\n")

    def read_config(self) -> dict:
        path = self.path / CONFIG
        if not path.is_file():
            raise TinygraftError(f"{str(self.path)!r} holds no config.json")
        return read_json(path, "run config")

    def log(self, row: dict) -> None:
        if not self.writer:
            return
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._board is not None:
            self._board.add(row)

    def open_board(self, config: dict, step: int) -> None:
        """Mirror the metrics to RUN/tensorboard/ from now on: rebuilt from metrics.jsonl as it stands (so call it
        after a resume has cut the rows back), then each row logged."""
        self.close_board()
        if not self.writer:
            return
        self._board = board.Board(self.path, config, self.metrics(), step)

    def close_board(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    def metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        rows = []
        # bytes that are not UTF-8 and lines cut short by a crash are skipped: the rows are a log, not the state
        for line in path.read_bytes().decode("utf-8", errors="replace").split("\n"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run will log again."""
        if not self.writer:
            return
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        checkpoint.atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def write_results(self, results: dict) -> None:
        if not self.writer:
            return
        checkpoint.atomic_write(self.path / RESULTS, json.dumps(results, indent=2) + "\n")

    def read_results(self) -> dict | None:
        path = self.path / RESULTS
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
