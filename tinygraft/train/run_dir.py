"""The run directory: config.json, metrics.jsonl, results.json, loss.png, checkpoints/.

Nothing a user had is lost: a directory that already holds a run is refused unless the run is resumed
(`--resume`) or replaced on purpose (`--overwrite`).
"""

import json
import shutil
from pathlib import Path

from tinygraft.core import checkpoint
from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
PLOT = "loss.png"
RUN_FILES = (CONFIG, METRICS, RESULTS, "checkpoints")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse what cannot work, before anything is deleted or written."""
        if resume and overwrite:
            raise TinygraftError("--resume and --overwrite contradict each other; choose one")
        if self.path.exists() and not self.path.is_dir():
            raise TinygraftError(f"output path {str(self.path)!r} is a file, not a directory")
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
        self.check(resume=resume, overwrite=overwrite)
        if resume:
            return
        if self.holds_run():
            for name in (*RUN_FILES, PLOT):
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        checkpoint.atomic_write(self.path / CONFIG, json.dumps(config, indent=2) + "\n")

    def read_config(self) -> dict:
        path = self.path / CONFIG
        if not path.is_file():
            raise TinygraftError(f"{str(self.path)!r} holds no config.json")
        return read_json(path, "run config")

    def log(self, row: dict) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return rows

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run will log again."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        checkpoint.atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def write_results(self, results: dict) -> None:
        checkpoint.atomic_write(self.path / RESULTS, json.dumps(results, indent=2) + "\n")

    def read_results(self) -> dict | None:
        path = self.path / RESULTS
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
