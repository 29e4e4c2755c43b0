"""read_json: the value, or one sentence naming the file (missing, not JSON, not UTF-8, the wrong kind of value)."""

import pytest

from tinygraft.core.jsonfile import jsonl_objects, read_json
from tinygraft.errors import TinygraftError


def test_values_and_each_failure_in_one_sentence(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2.5, "x"]}', encoding="utf-8")
    assert read_json(good, "run config") == {"a": [1, 2.5, "x"]}
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert read_json(listed, "modules file", list) == [1, 2] and read_json(listed, "any", None) == [1, 2]
    (tmp_path / "cut.json").write_text('{"a": [1, 2')
    (tmp_path / "bytes.json").write_bytes(b'{"a": "\xff\xfe"}')
    cases = [
        (tmp_path / "missing.json", dict, "run config '{}' does not exist"),
        (tmp_path / "cut.json", dict, "run config '{}' is not valid JSON (Expecting"),
        (tmp_path / "bytes.json", dict, "run config '{}' is not valid JSON ("),
        (listed, dict, "run config '{}' holds an array, not an object"),
        (good, list, "run config '{}' holds an object, not an array"),
    ]
    for path, expect, message in cases:
        with pytest.raises(TinygraftError) as e:
            read_json(path, "run config", expect)
        assert str(e.value).startswith(message.format(path)) and "\n" not in str(e.value)


def test_jsonl_objects_number_lines_and_name_the_bad_one():
    assert jsonl_objects('{"a": 1}\n\n  \n{"b": [2]}\n', "x") == [(1, {"a": 1}), (4, {"b": [2]})]
    assert jsonl_objects("", "x") == []
    for text, message in (
        ('{"a": 1}\n{"a": \n', "data 'f' line 2 is not valid JSON ("),
        ('{"a": 1}\n[1, 2]\n', "data 'f' line 2 is not a JSON object"),
    ):
        with pytest.raises(TinygraftError) as e:
            jsonl_objects(text, "data 'f'")
        assert str(e.value).startswith(message)
