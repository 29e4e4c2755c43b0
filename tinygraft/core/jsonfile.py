"""Reading JSON we were handed, or failing with one sentence that names the file (and the line).

Every reader of a config, a checkpoint's state, an adapter config or a results file goes through `read_json`, and
every reader of JSON Lines data (corpora, labeled examples, texts to embed) through `jsonl_objects`, so a damaged
file reads the same everywhere: "<what> '<path>' is not valid JSON (<where the parser stopped>)".
"""

import json
from pathlib import Path
from typing import Any

from tinygraft.errors import TinygraftError

JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}  # fmt: skip


def read_json(path: str | Path, what: str, expect: type | None = dict) -> Any:
    """The JSON value in `path`; `what` names the file for the reader ("checkpoint file", "adapter config", ...).

    `expect` is the type the value must have (an object by default; None takes any). A caller that can say what a
    missing file means (no model here, a run that never finished) checks for it first; otherwise it is reported
    as missing in the same form.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinygraftError(f"{what} '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinygraftError(f"{what} '{path}' is not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        got, wanted = JSON_NAMES[type(value)], JSON_NAMES[expect]
        raise TinygraftError(f"{what} '{path}' holds {got}, not {wanted}")
    return value


def jsonl_objects(text: str, name: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON Lines `text`; `name` names the source in errors."""
    rows = []
    # "\n" only: str.splitlines() also splits on U+2028 and other separators, which JSON allows inside a string
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinygraftError(f"{name} line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TinygraftError(f"{name} line {n} is not a JSON object")
        rows.append((n, row))
    return rows
