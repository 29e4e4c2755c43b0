"""Where an analysis writes its JSON and its chart, checked before any work and written atomically.

    --out DIR    DIR/<name>.json and DIR/<name>.png (as `compare` writes compare.json and compare.png in its --out)
    --png PATH   PATH and, beside it, the JSON (PATH with the suffix .json)

An existing file is kept unless --overwrite; each file is written whole into a temporary file and renamed
(core/checkpoint.py: atomic_write), so a crash never leaves half a chart.
"""

import io
import json
import math
from pathlib import Path

from tinygraft.core.checkpoint import atomic_write
from tinygraft.errors import TinygraftError


def output_paths(out: str | None, png: str | None, name: str, overwrite: bool) -> tuple[Path, Path] | None:
    """(json, png) paths, or None when neither --out nor --png is given (the table is printed only)."""
    if out is None and png is None:
        return None
    if png is not None:
        path = Path(png)
        if path.suffix != ".png":
            raise TinygraftError(f"--png '{path}' must end in .png")
        paths = (path.with_suffix(".json"), path)
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise TinygraftError(f"--out '{folder}' is a file; give a directory for {name}.json and {name}.png")
        paths = (folder / f"{name}.json", folder / f"{name}.png")
    for path in paths:
        if path.exists() and not overwrite:
            raise TinygraftError(f"'{path}' already exists; pass --overwrite to replace it")
    return paths


def json_safe(value):
    """NaN (an undefined similarity, a constant layer) as null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def to_json(report: dict) -> str:
    return json.dumps(json_safe(report), indent=2) + "\n"


def pyplot():
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")  # no display needed; only a file is written
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def write_outputs(paths: tuple[Path, Path], report: dict, figure) -> None:
    json_path, png_path = paths
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110)
    pyplot().close(figure)
    atomic_write(json_path, to_json(report))
    atomic_write(png_path, buf.getvalue())
