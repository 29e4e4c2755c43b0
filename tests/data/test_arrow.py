"""Parquet files and `datasets`' save_to_disk directories (tinygraft/data/arrow.py) read as the TSV/JSONL of the same
rows: classification, pairs, NER lists, QA answers, pretraining text; splits, shards, hashing, and each bad input as
one sentence. The saved layouts are written here with pyarrow alone, as `datasets` (>= 2) writes them: Arrow IPC
streams `data-0000k-of-0000N.arrow`, state.json listing them in order, dataset_info.json with the features, and for a
DatasetDict a dataset_dict.json {"splits": [...]} beside one such directory per split."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.train.finetune_fixtures import make_bert_dir, write_tsv
from tinygraft.cli.main import main
from tinygraft.data import arrow
from tinygraft.data.corpus import read_corpus
from tinygraft.data.labeled import read_labeled
from tinygraft.data.ner import read_tagged
from tinygraft.data.qa import read_qa_table
from tinygraft.errors import TinygraftError

TEXTS = [f"sentence number {i} about {'logging' if i % 2 else 'asyncio'} things" for i in range(12)]
LABELS = ["logging" if i % 2 else "asyncio" for i in range(12)]
NAMES = ["asyncio", "logging"]


def save_dataset(directory: Path, columns: dict, shards: int = 1, features: dict | None = None, split="train"):
    """`Dataset.save_to_disk(directory, num_shards=shards)`: contiguous shards, each an Arrow IPC stream."""
    directory.mkdir(parents=True)
    features = features or {}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.table(columns).replace_schema_metadata(meta)
    n, files = table.num_rows, []
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        start, stop = k * n // shards, (k + 1) * n // shards
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(start, stop - start))
        files.append({"filename": name})
    state = {"_data_files": files, "_fingerprint": "0123456789abcdef", "_format_columns": None, "_format_kwargs": {},
             "_format_type": None, "_output_all_columns": False, "_split": split}  # fmt: skip
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_size": None, "description": "",
            "download_checksums": None, "download_size": None, "features": features, "homepage": "", "license": "",
            "size_in_bytes": None, "splits": None, "supervised_keys": None, "version": None}  # fmt: skip
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return directory


def save_dataset_dict(directory: Path, splits: dict[str, dict], shards: int = 1, features: dict | None = None):
    """`DatasetDict.save_to_disk(directory)`."""
    directory.mkdir(parents=True)
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, columns in splits.items():
        save_dataset(directory / name, columns, shards, features, split=name)
    return directory


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.count(". ") == 0 and "Traceback" not in message


def as_tuples(examples):
    return [(e.text, e.text_pair, e.label) for e in examples]  # lines differ: a TSV's header is its line 1


CLASS_LABEL = {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": NAMES, "_type": "ClassLabel"}}


# ------------------------------------------------------------------------------------------------ the same rows
def test_classification_reads_as_the_tsv_of_the_same_rows(tmp_path):
    tsv = read_labeled(write_tsv(tmp_path / "t.tsv", ["text", "label"], zip(TEXTS, LABELS)))
    columns = {"text": TEXTS, "label": LABELS}
    parquet = read_labeled(write_parquet(tmp_path / "t.parquet", columns))
    single = read_labeled(save_dataset(tmp_path / "one", columns))
    sharded = read_labeled(save_dataset(tmp_path / "three", columns, shards=3))  # rows in state.json's order
    class_label = {"text": TEXTS, "label": [NAMES.index(y) for y in LABELS]}  # ints + names, as GLUE is stored
    named = read_labeled(save_dataset(tmp_path / "ints", class_label, shards=2, features=CLASS_LABEL))
    assert as_tuples(tsv) == as_tuples(parquet) == as_tuples(single) == as_tuples(sharded) == as_tuples(named)
    assert [e.line for e in tsv] == [e.line + 1 for e in sharded] == list(range(2, 14))  # the row number here


def test_dataset_dict_splits_and_the_split_a_side_defaults_to(tmp_path):
    rows = lambda a, b: {"text": TEXTS[a:b], "label": LABELS[a:b]}  # noqa: E731
    d = save_dataset_dict(tmp_path / "dd", {"train": rows(0, 6), "validation": rows(6, 9), "test": rows(9, 12)}, 2)
    assert [e.text for e in read_labeled(d)] == TEXTS[:6]  # --train DIR: its train split
    assert arrow.with_split(str(d), "validation") == f"{d}:validation"  # --val DIR: its validation split
    assert [e.text for e in read_labeled(arrow.with_split(str(d), "validation"))] == TEXTS[6:9]
    assert [e.text for e in read_labeled(f"{d}:test")] == TEXTS[9:]
    assert arrow.with_split(str(tmp_path / "t.tsv"), "validation") == str(tmp_path / "t.tsv")  # not a DatasetDict
    # a path with ':' that exists is that file, not a split
    odd = write_tsv(tmp_path / "a:b.tsv", ["text", "label"], [("x", "y")])
    assert read_labeled(odd)[0].text == "x" and not arrow.is_source(odd)


def test_pair_task_reads_as_the_tsv(tmp_path):
    scores = [f"{i % 5:.1f}" for i in range(11)]
    tsv = write_tsv(tmp_path / "p.tsv", ["sentence1", "sentence2", "score"], zip(TEXTS, TEXTS[1:], scores))
    columns = {"sentence1": TEXTS[:11], "sentence2": TEXTS[1:], "score": [float(s) for s in scores]}
    kw = {"text_col": "sentence1", "text_pair_col": "sentence2", "label_col": "score", "problem": "regression"}
    want = as_tuples(read_labeled(tsv, **kw))
    assert as_tuples(read_labeled(write_parquet(tmp_path / "p.parquet", columns), **kw)) == want
    d = save_dataset_dict(tmp_path / "pairs", {"train": columns})
    assert as_tuples(read_labeled(d, **kw)) == want


def test_ner_token_and_tag_lists_read_as_jsonl(tmp_path):
    tokens = [t.split() for t in TEXTS[:6]]
    tags = [["B-LOG" if w == "logging" else "O" for w in ws] for ws in tokens]
    jsonl = read_tagged(write_jsonl(tmp_path / "n.jsonl", [{"tokens": w, "tags": t} for w, t in zip(tokens, tags)]))
    parquet = read_tagged(write_parquet(tmp_path / "n.parquet", {"tokens": tokens, "tags": tags}))
    names = ["O", "B-LOG"]  # CoNLL-2003's ner_tags: Sequence(ClassLabel) stored as lists of ints
    features = {"tokens": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
                "ner_tags": {"feature": {"names": names, "_type": "ClassLabel"}, "_type": "Sequence"}}  # fmt: skip
    ids = {"tokens": tokens, "ner_tags": [[names.index(t) for t in ts] for ts in tags]}
    saved = read_tagged(save_dataset_dict(tmp_path / "conll", {"train": ids}, 2, features), tags_col="ner_tags")
    assert jsonl == parquet == saved and jsonl[0].tags == tags[0]


def test_qa_nested_answers_as_datasets_stores_squad(tmp_path):
    contexts = TEXTS[:4]
    answers = [{"text": [c.split()[2]], "answer_start": [c.index(c.split()[2])]} for c in contexts]
    rows = {"id": list("0123"), "question": ["which number?"] * 4, "context": contexts, "answers": answers}
    kw = {"answer_col": "answers", "id_col": "id"}
    jsonl = write_jsonl(tmp_path / "q.jsonl", [dict(zip(rows, v)) for v in zip(*rows.values())])
    from_jsonl = read_qa_table(jsonl, **kw)
    from_arrow = read_qa_table(save_dataset(tmp_path / "squad", rows), **kw)
    assert from_jsonl == from_arrow
    assert from_arrow[2].answers == ["2"] and from_arrow[2].answer_starts == [contexts[2].index("2")]


def test_pretraining_text_reads_as_jsonl(tmp_path):
    want = read_corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": t, "n": i} for i, t in enumerate(TEXTS)]))
    columns = {"text": TEXTS, "n": list(range(12))}
    assert read_corpus(write_parquet(tmp_path / "c.parquet", columns)) == want
    assert read_corpus(save_dataset(tmp_path / "saved", columns, shards=3)) == want
    d = save_dataset_dict(tmp_path / "dd", {"train": columns, "validation": {"text": ["other"], "n": [0]}})
    assert read_corpus(d) == want and read_corpus(f"{d}:validation") == ["other"]  # the default split: train
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "b.parquet", {"body": TEXTS[6:]})
    write_parquet(shards / "a.parquet", {"body": TEXTS[:6]})
    assert read_corpus(shards, text_field="body") == want  # a directory of Parquet files, in name order


def test_an_ipc_file_instead_of_a_stream_is_read_too(tmp_path):
    d = save_dataset(tmp_path / "ds", {"text": TEXTS, "label": LABELS})
    table = pa.table({"text": TEXTS, "label": LABELS})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert [e.text for e in read_labeled(d)] == TEXTS


def test_a_directory_hashes_by_the_split_it_reads(tmp_path):
    rows = {"text": TEXTS, "label": LABELS}
    d = save_dataset_dict(tmp_path / "dd", {"train": rows, "validation": rows, "test": {"text": ["x"], "label": ["y"]}})
    train, val, test = arrow.data_sha256(d), arrow.data_sha256(d, "validation"), arrow.data_sha256(f"{d}:test")
    assert train and test and train != test and arrow.data_sha256(f"{d}:train") == train
    save_dataset(tmp_path / "other", {"text": TEXTS[::-1], "label": LABELS[::-1]})
    assert arrow.data_sha256(tmp_path / "other") != train
    assert arrow.data_sha256(tmp_path / "missing") is None and arrow.data_sha256(None) is None
    assert val == train  # the same rows and features in both splits: the same examples, the same digest
    before = arrow.data_sha256(d)
    with pa.OSFile(str(d / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
        table = pa.table({"text": TEXTS[:3], "label": LABELS[:3]})
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    assert arrow.data_sha256(d) != before


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_one_sentence(tmp_path, monkeypatch):
    parquet = write_parquet(tmp_path / "t.parquet", {"sentence": TEXTS, "label": LABELS})
    d = save_dataset_dict(tmp_path / "dd", {"train": {"text": TEXTS}, "test": {"text": TEXTS}})
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "plain").mkdir()
    cases = [
        (lambda: read_labeled(parquet), [str(parquet), "no column 'text'", "columns found: sentence, label"]),
        (lambda: read_corpus(parquet), [str(parquet), "no column 'text'", "sentence, label"]),
        (lambda: read_tagged(parquet), [str(parquet), "no column 'tokens'"]),
        (lambda: read_labeled(arrow.with_split(str(d), "validation")),
         [str(d), "no split 'validation'", "its splits: train, test", f"'{d}:SPLIT'"]),
        (lambda: read_corpus(f"{d}:dev"), [str(d), "no split 'dev'", "train, test"]),
        (lambda: read_labeled(tmp_path / "broken.parquet"), ["broken.parquet", "is not a readable Parquet file"]),
        (lambda: read_labeled(tmp_path / "plain"), ["plain", "not a `datasets` save_to_disk directory"]),
    ]  # fmt: skip
    for call, parts in cases:
        with pytest.raises(TinygraftError) as e:
            call()
        message = str(e.value)
        assert all(p in message for p in parts) and one_sentence(message), message
    (d / "train" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(TinygraftError, match="lacks its data file data-00000-of-00001.arrow"):
        read_labeled(d)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where pyarrow is not installed
    for call in (lambda: read_labeled(parquet), lambda: read_corpus(f"{d}:test")):
        with pytest.raises(TinygraftError) as e:
            call()
        assert "needs pyarrow" in str(e.value) and "pip install 'tinygraft[arrow]'" in str(e.value)
        assert one_sentence(str(e.value))


# ------------------------------------------------------------------------------------------------ the command
@pytest.mark.usefixtures("one_thread")
def test_finetune_on_parquet_train_and_a_saved_validation_split(tmp_path, capsys):
    texts = [f"{'import logging and log' if y == 'logging' else 'await the asyncio loop'} {t}" for t, y in
             zip(TEXTS * 3, LABELS * 3)]  # fmt: skip
    labels = LABELS * 3
    bert = make_bert_dir(tmp_path, texts)
    train = write_parquet(tmp_path / "train.parquet", {"text": texts[:24], "label": labels[:24]})
    val = save_dataset_dict(tmp_path / "dd", {"train": {"text": texts[:4], "label": labels[:4]},
                                              "validation": {"text": texts[24:], "label": labels[24:]}})  # fmt: skip
    out = tmp_path / "run"
    args = ["finetune", "--from", bert, "--out", out, "--train", train, "--val", val, "--steps", 2, "--batch-size", 8,
            "--max-length", 32, "--eval-every", 2]  # fmt: skip
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "classify" and "accuracy" in results["metrics"]
    state = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["data_sha256"]["val"] == arrow.data_sha256(val, "validation")  # the directory is hashed
    assert state["data_sha256"]["train"] == arrow.data_sha256(train)

    code = main([str(a) for a in [*args[:4], tmp_path / "bad", *args[5:], "--text-col", "sentence"]])
    _, err = capsys.readouterr()
    message = err.strip().removeprefix("error: ")
    assert code == 2 and "has no column 'sentence'" in err and str(train) in err and one_sentence(message), err
