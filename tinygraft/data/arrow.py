"""Parquet files and `datasets`' save_to_disk directories as tables of rows, read with pyarrow alone.

    x.parquet / x.arrow            one table
    DIR/  state.json dataset_info.json data-00000-of-0000N.arrow ...     a saved Dataset (the shards in
                                   state.json's `_data_files` order, each an Arrow IPC stream)
    DIR/  dataset_dict.json train/ validation/ ...                       a saved DatasetDict: one Dataset per split
    DIR:SPLIT                      one split of a saved DatasetDict (DIR without one: the caller's default split)

Rows come out as JSONL rows do: a dict per row, list columns as Python lists, struct columns as dicts. A column
the dataset's features call a ClassLabel (integers with names, as GLUE labels and CoNLL-2003 tags are stored)
gives the names, so the label map is the dataset's own; its -1 ("no label") gives None. The row numbers handed on
as "line" numbers are 1-based and count across shards: line N is the dataset's row index N-1.

pyarrow is an optional extra (`pip install 'tinygraft[arrow]'`), imported only when such a file is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tinygraft.errors import TinygraftError

SUFFIXES = (".parquet", ".arrow")
DICT_JSON, STATE_JSON, INFO_JSON = "dataset_dict.json", "state.json", "dataset_info.json"


# ------------------------------------------------------------------------------------------------- locating
def _split_spec(path: str | Path) -> tuple[Path, str] | None:
    """(DIR, SPLIT) for 'DIR:SPLIT' naming a split of a saved DatasetDict; a path that exists is never one."""
    text = str(path)
    head, sep, split = text.rpartition(":")
    if not sep or not head or not split or Path(text).exists() or not (Path(head) / DICT_JSON).is_file():
        return None
    return Path(head), split


def is_source(path: str | Path) -> bool:
    """Whether this module reads `path`: a .parquet / .arrow file, a save_to_disk directory, or DIR:SPLIT."""
    p = Path(path)
    if p.is_file():
        return p.suffix in SUFFIXES
    if p.is_dir():
        return (p / DICT_JSON).is_file() or _is_dataset(p)
    return _split_spec(path) is not None


def _is_dataset(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file() and (directory / INFO_JSON).is_file()  # as load_from_disk asks


def with_split(path: str | None, split: str) -> str | None:
    """`path` with `split` named when it is a saved DatasetDict given without one (--val DIR reads 'validation')."""
    if path is None or not (Path(path) / DICT_JSON).is_file():
        return path
    return f"{path}:{split}"


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinygraftError(f"saved dataset file '{file}' is not readable JSON ({e})") from None


def _splits(root: Path) -> list[str]:
    splits = _read_json(root / DICT_JSON)
    splits = splits.get("splits") if isinstance(splits, dict) else None
    if not isinstance(splits, list):
        raise TinygraftError(f"'{root / DICT_JSON}' has no 'splits' list; is '{root}' a saved DatasetDict?")
    return [str(s) for s in splits]


def locate(path: str | Path, default_split: str = "train") -> tuple[Path, list[Path]]:
    """(the Dataset directory or file read, its data files in row order) of a source `is_source` accepts."""
    spec = _split_spec(path)
    root, split = spec if spec else (Path(path), None)
    if root.is_file():
        return root, [root]
    if split is None and _is_dataset(root):
        return root, _data_files(root)
    split = split or default_split
    splits = _splits(root)
    if split not in splits:
        raise TinygraftError(
            f"saved dataset '{root}' has no split {split!r} (its splits: {', '.join(splits)}); name one as "
            f"'{root}:SPLIT'"
        )
    if not _is_dataset(root / split):
        raise TinygraftError(
            f"split {split!r} of saved dataset '{root}' lacks its directory, {STATE_JSON} or {INFO_JSON}"
        )
    return root / split, _data_files(root / split)


def _data_files(directory: Path) -> list[Path]:
    state = _read_json(directory / STATE_JSON)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
        raise TinygraftError(f"'{directory / STATE_JSON}' lists no '_data_files'; is '{directory}' a saved Dataset?")
    files = [directory / e["filename"] for e in entries]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise TinygraftError(f"saved dataset '{directory}' lacks its data file {missing[0]} (listed in {STATE_JSON})")
    return files


# ------------------------------------------------------------------------------------------------- reading
def _pyarrow(path: str | Path):
    try:
        # imported here, not at the top: pyarrow is an optional extra, and every other format reads without it
        import pyarrow  # noqa: PLC0415
        import pyarrow.ipc  # noqa: PLC0415
        import pyarrow.parquet  # noqa: PLC0415
    except ImportError:
        raise TinygraftError(
            f"reading '{path}' needs pyarrow; install it with pip install 'tinygraft[arrow]'"
        ) from None
    return pyarrow


def _read_table(pa, file: Path, columns: list[str] | None):
    try:
        if file.suffix == ".parquet":
            return pa.parquet.read_table(file, columns=columns)
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()  # what `datasets` writes
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()  # the random-access file format (Feather v2)
        return table.select(columns) if columns is not None else table
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if file.suffix == ".parquet" else "Arrow"
        raise TinygraftError(f"'{file}' is not a readable {kind} file ({_reason(e, file)})") from None


def _reason(e: Exception, file: Path) -> str:
    """pyarrow's message cut to its first sentence, less a repeat of the path: "Parquet magic bytes not found"."""
    text = str(e).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return (text.rsplit(f"{file}': ", 1)[-1] if str(file) in text else text) or type(e).__name__


def column_names(path: str | Path, default_split: str = "train") -> list[str]:
    """The columns of a source, from its schema alone (no rows are read)."""
    pa = _pyarrow(path)
    _, files = locate(path, default_split)
    file = files[0]
    try:
        if file.suffix == ".parquet":
            return list(pa.parquet.read_schema(file).names)
        with pa.memory_map(str(file)) as source:
            try:
                return list(pa.ipc.open_stream(source).schema.names)
            except pa.ArrowInvalid:
                source.seek(0)
                return list(pa.ipc.open_file(source).schema.names)
    except (pa.ArrowException, OSError):
        return _read_table(pa, file, None).column_names  # states why the file is unreadable


def read_rows(
    path: str | Path, default_split: str = "train", columns: list[str] | None = None
) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(row number, row dict)]) of a source, as labeled.read_rows gives them for a JSONL file.

    `columns`: read only these (each must exist: the caller checks them against `column_names` first).
    """
    pa = _pyarrow(path)
    where, files = locate(path, default_split)
    tables = [_read_table(pa, f, columns) for f in files]
    try:
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid:
        raise TinygraftError(f"the data files of saved dataset '{where}' do not share one schema") from None
    names = list(table.column_names)
    features = _features(where, table.schema)
    values = [_decode(table.column(n).to_pylist(), features.get(n)) for n in names]
    return names, [(i + 1, dict(zip(names, row))) for i, row in enumerate(zip(*values))]


# ----------------------------------------------------------------------------------------- ClassLabel names
def _features(where: Path, schema) -> dict:
    """The `datasets` features: the schema's "huggingface" metadata, else the Dataset's dataset_info.json."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        if raw is not None:
            features = json.loads(raw).get("info", {}).get("features")
        elif where.is_dir() and (where / INFO_JSON).is_file():
            features = _read_json(where / INFO_JSON).get("features")
        else:
            features = None
    except (AttributeError, json.JSONDecodeError, UnicodeDecodeError):
        features = None  # features are a convenience (label names); the rows read without them
    return features if isinstance(features, dict) else {}


def _class_names(feature: Any) -> tuple[list[str] | None, bool]:
    """(ClassLabel names, whether the column holds lists of them): Sequence/List(ClassLabel) or [ClassLabel]."""
    if isinstance(feature, list) and len(feature) == 1:
        return _class_names(feature[0])[0], True
    if not isinstance(feature, dict):
        return None, False
    if feature.get("_type") in ("Sequence", "List", "LargeList"):
        return _class_names(feature.get("feature"))[0], True
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return ([str(n) for n in names] if isinstance(names, list) else None), False


def _decode(values: list, feature: Any) -> list:
    names, nested = _class_names(feature)
    if names is None:
        return values

    def name(v):
        return names[v] if isinstance(v, int) and 0 <= v < len(names) else None if v == -1 else v

    return [[name(x) for x in v] if nested and isinstance(v, list) else name(v) for v in values]


# ------------------------------------------------------------------------------------------------- hashing
def data_sha256(path: str | Path | None, default_split: str = "train") -> str | None:
    """sha256 of what a data path reads: a file's bytes; a saved dataset's data files and dataset_info.json (the
    split read, by name and content); None when there is nothing there (the caller records no digest)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if not is_source(path):
        return None
    where, files = locate(path, default_split)
    h = hashlib.sha256()
    for f in [*files, *([where / INFO_JSON] if (where / INFO_JSON).is_file() else [])]:
        name = f.name.encode("utf-8")  # each name and file length-prefixed: no two layouts hash alike
        h.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
