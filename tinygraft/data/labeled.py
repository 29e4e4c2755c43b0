"""Labeled data for fine-tuning: read TSV / CSV / JSONL with named columns, map labels, tokenise, pad per batch.

    file --read_labeled--> [Example(text, text_pair, label, line)] --encode_*--> [feature dicts of Python lists]
         --LabeledBatcher / eval_batches + collate--> dict of (B, T_max) tensors, padded to the longest in the batch

File formats, chosen by suffix: `.tsv` (tab) and `.csv` (comma) with a header row; `.jsonl` one object per line
(`.json`: one array of objects); `.parquet`, `.arrow` and `datasets`' save_to_disk directories, DIR[:SPLIT]
(data/arrow.py: a row per example, "line" N being row N). `quote_none=True` reads quote characters as text
(csv.QUOTE_NONE): STS-B has stray quotes that would otherwise swallow rows. Line numbers in errors are the file's
own, 1-based.

The label map is built from the training file only, saved as JSON beside the checkpoint (`id2label` /
`label2id`, the keys `transformers` uses in config.json); a label at evaluation that training never saw is an
error naming it and its line. NER data lives in core/ner_data.py, QA in core/qa_data.py.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygraft.core.jsonfile import jsonl_objects
from tinygraft.data import arrow
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError

DELIMITERS = {".tsv": "\t", ".txt": "\t", ".csv": ","}
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class Example:
    text: str
    text_pair: str | None  # second sentence (pairs: NLI, STS-B), or None
    label: Any  # str (classes), float (scores), list[str] (multi-label), None (unlabeled, predict)
    line: int  # 1-based line of the row in its file


# ------------------------------------------------------------------------------------------------------ reading
def read_rows(path: str | Path, quote_none: bool = False) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line, row dict)]) of a TSV/CSV (header row) or JSONL/JSON file of objects, or of a
    Parquet / Arrow file or saved dataset (DIR[:SPLIT], its train split by default; line = row number)."""
    if arrow.is_source(path):
        columns, rows = arrow.read_rows(path)
        if not rows:
            raise TinygraftError(f"data '{path}' holds no rows")
        return columns, rows
    path = Path(path)
    if path.is_dir():
        raise TinygraftError(
            f"data path '{path}' is a directory but not a `datasets` save_to_disk directory (it has no "
            f"{arrow.DICT_JSON}, nor {arrow.STATE_JSON} and {arrow.INFO_JSON})"
        )
    if not path.is_file():
        raise TinygraftError(f"data file '{path}' does not exist")
    if path.suffix in JSON_SUFFIXES:
        rows = _read_json_rows(path)
        columns = list(dict.fromkeys(k for _, row in rows for k in row))
    elif path.suffix in DELIMITERS:
        columns, rows = _read_delimited(path, DELIMITERS[path.suffix], quote_none)
    else:
        raise TinygraftError(f"data file '{path}' has an unknown suffix; use .tsv, .csv, .jsonl, .json or .parquet")
    if not rows:
        raise TinygraftError(f"data file '{path}' holds no rows")
    return columns, rows


def _read_delimited(path: Path, delimiter: str, quote_none: bool):
    quoting = csv.QUOTE_NONE if quote_none else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as f:  # a BOM is no part of the first name
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise TinygraftError(f"data file '{path}' is empty") from None
        except UnicodeDecodeError:
            raise TinygraftError(f"data file '{path}' is not UTF-8 text") from None
        rows, line = [], reader.line_num + 1
        try:
            for fields in reader:
                if fields:
                    if len(fields) != len(header):
                        hint = "" if quote_none else " (stray quotes? read it with quote_none / --quote-none)"
                        raise TinygraftError(
                            f"{path} line {line} has {len(fields)} fields but the header has {len(header)}{hint}"
                        )
                    rows.append((line, dict(zip(header, fields))))
                line = reader.line_num + 1
        except UnicodeDecodeError:
            raise TinygraftError(f"data file '{path}' is not UTF-8 text") from None
        except csv.Error as e:
            raise TinygraftError(
                f"{path} line {reader.line_num} is not valid {path.suffix[1:].upper()} ({e})"
            ) from None
    return [h.strip() for h in header], [(n, {k.strip(): v for k, v in r.items()}) for n, r in rows]


def _read_json_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TinygraftError(f"data file '{path}' is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TinygraftError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TinygraftError(f"{path} must hold a JSON array of objects (one per example)")
        return [(i + 1, r) for i, r in enumerate(data)]
    return jsonl_objects(text, str(path))


def require_columns(path: str | Path, columns: Sequence[str], wanted: Iterable[str | None]) -> None:
    for col in wanted:
        if col is not None and col not in columns:
            raise TinygraftError(f"{path} has no column {col!r} (columns found: {', '.join(columns)})")


def read_labeled(
    path: str | Path,
    text_col: str = "text",
    label_col: str | None = "label",
    text_pair_col: str | None = None,
    problem: str = "single_label",
    quote_none: bool = False,
    label_sep: str = ",",
) -> list[Example]:
    """Examples from a file with named columns; `label_col=None` reads unlabeled text (prediction).

    `problem`: "single_label" (label kept as a string), "regression" (a float), "multi_label" (a JSON list, or
    `label_sep`-separated names in a TSV/CSV cell; an empty cell is no label).
    """
    columns, rows = read_rows(path, quote_none)
    require_columns(path, columns, [text_col, text_pair_col, label_col])
    examples = []
    for line, row in rows:
        text = row.get(text_col)
        if not isinstance(text, str):
            raise TinygraftError(
                f"{path} line {line}: column {text_col!r} is {'missing' if text is None else 'not text'}"
            )
        pair = row.get(text_pair_col) if text_pair_col else None
        if text_pair_col and not isinstance(pair, str):
            raise TinygraftError(f"{path} line {line}: column {text_pair_col!r} is missing or not text")
        label = _parse_label(row.get(label_col), problem, label_sep, f"{path} line {line}") if label_col else None
        examples.append(Example(text, pair, label, line))
    return examples


def _parse_label(value: Any, problem: str, sep: str, where: str):
    if value is None or (isinstance(value, str) and not value.strip() and problem != "multi_label"):
        raise TinygraftError(f"{where} has no label")
    if problem == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TinygraftError(f"{where}: label {value!r} is not a number (the task is regression)") from None
    if problem == "multi_label":
        items = value if isinstance(value, list) else [s for s in str(value).split(sep) if s.strip()]
        return [_label_str(v) for v in items]
    if problem != "single_label":
        raise TinygraftError(f"unknown problem type {problem!r} (known: single_label, multi_label, regression)")
    return _label_str(value)


def _label_str(v: Any) -> str:
    # JSON 1 and TSV "1" are the same class; a float-valued class like 1.0 stays as written
    return str(v).strip() if not isinstance(v, bool) else str(v).lower()


# ---------------------------------------------------------------------------------------------------- label map
class LabelMap:
    """Class names <-> ids, built from the training labels (numeric names sort as numbers: 2 before 10)."""

    def __init__(self, names: Sequence[str]):
        if len(set(names)) != len(names):
            raise TinygraftError("label names must be unique")
        self.names = list(names)
        self._ids = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def build(cls, labels: Iterable[Any]) -> LabelMap:
        """From the training labels (strings, or lists of strings for multi-label data)."""
        seen = set()
        for lab in labels:
            seen.update(lab if isinstance(lab, list) else [lab])
        if not seen:
            raise TinygraftError("the training data has no labels")

        def key(n: str):
            try:
                return (0, float(n), n)
            except ValueError:
                return (1, 0.0, n)

        return cls(sorted(seen, key=key))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._ids

    def id(self, name: str, where: str = "the data") -> int:
        if name not in self._ids:
            raise TinygraftError(
                f"unknown label {name!r} at {where} (the training labels are: {', '.join(self.names[:20])}"
                f"{', ...' if len(self.names) > 20 else ''})"
            )
        return self._ids[name]

    def to_dict(self) -> dict:
        return {"id2label": {str(i): n for i, n in enumerate(self.names)}, "label2id": dict(self._ids)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        try:
            id2label = d["id2label"]
            return cls([id2label[str(i)] for i in range(len(id2label))])
        except (KeyError, TypeError):
            raise TinygraftError("label map must hold 'id2label' with ids 0..N-1") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise TinygraftError(f"cannot read label map '{path}' ({e})") from None


def check_label_count(label_map: LabelMap, num_labels: int, source: str = "the loaded head") -> None:
    """The data's label count must equal the head's output size (a head loaded from a checkpoint)."""
    if len(label_map) != num_labels:
        raise TinygraftError(
            f"the data has {len(label_map)} labels ({', '.join(label_map.names[:10])}) but {source} has "
            f"{num_labels} outputs; train a new head or use data with the same labels"
        )


# ------------------------------------------------------------------------------------------------ tokenisation
def encode_classification(
    examples: Sequence[Example],
    tokenizer: TextTokenizer,
    max_length: int,
    label_map: LabelMap | None = None,
    problem: str = "single_label",
    source: str = "the data",
) -> list[dict]:
    """Features for a sequence head: input_ids, token_type_ids and (when labeled) labels.

    labels: class id (single_label, needs `label_map`), multi-hot float list (multi_label), float (regression).
    """
    feats = []
    for ex in examples:
        ids, types = tokenizer.encode_for_model(ex.text, ex.text_pair, max_length=max_length)
        f = {"input_ids": ids, "token_type_ids": types}
        if ex.label is not None:
            f["labels"] = _label_value(ex.label, label_map, problem, f"{source} line {ex.line}")
        feats.append(f)
    return feats


def _label_value(label, label_map: LabelMap | None, problem: str, where: str):
    if problem == "regression":
        return float(label)
    if label_map is None:
        raise TinygraftError("classification data needs a label map (build it from the training file)")
    if problem == "multi_label":
        hot = [0.0] * len(label_map)
        for name in label:
            hot[label_map.id(name, where)] = 1.0
        return hot
    return label_map.id(label, where)


def encode_pairs(examples: Sequence[Example], tokenizer: TextTokenizer, max_length: int) -> list[dict]:
    """Bi-encoder features: each sentence encoded alone (suffix _a / _b); labels = the raw score when labeled."""
    feats = []
    for ex in examples:
        if ex.text_pair is None:
            raise TinygraftError(f"line {ex.line} has no second sentence; the similarity task needs --text-pair-col")
        a, ta = tokenizer.encode_for_model(ex.text, max_length=max_length)
        b, tb = tokenizer.encode_for_model(ex.text_pair, max_length=max_length)
        f = {"input_ids_a": a, "token_type_ids_a": ta, "input_ids_b": b, "token_type_ids_b": tb}
        if ex.label is not None:
            f["labels"] = float(ex.label)
        feats.append(f)
    return feats


def encode_prompt_completion(tokenizer: TextTokenizer, prompt: str, completion: str, max_length: int) -> dict:
    """GPT instruction example: ids = prompt + completion + <eos>; labels = ids with the prompt set to -100.

    Prompt and completion are tokenised separately, so the boundary is where the prompt ends. Too long: the
    completion keeps at least half of `max_length` (or all of itself), the prompt loses tokens from its start
    (the instruction's end sits next to the answer).
    """
    if tokenizer.eos_id is None:
        raise TinygraftError("prompt-completion data needs a tokenizer with an end-of-text token (a GPT tokenizer)")
    p = tokenizer.encode(prompt)
    t = [*tokenizer.encode(completion), tokenizer.eos_id]
    if len(p) + len(t) > max_length:
        keep_t = min(len(t), max(max_length - len(p), max_length // 2))
        p, t = p[len(p) - (max_length - keep_t) :] if max_length > keep_t else [], t[:keep_t]
    return {"input_ids": p + t, "labels": [-100] * len(p) + t}


def encode_prompt_completions(examples: Sequence[Example], tokenizer: TextTokenizer, max_length: int) -> list[dict]:
    """Instruction features from `read_labeled(path, text_col=PROMPT, text_pair_col=COMPLETION, label_col=None)`."""
    feats = []
    for ex in examples:
        if ex.text_pair is None:
            raise TinygraftError(f"line {ex.line} has no completion; the instruct task needs --text-pair-col")
        feats.append(encode_prompt_completion(tokenizer, ex.text, ex.text_pair, max_length))
    return feats


# ----------------------------------------------------------------------------------------------------- batching
PADDED = {"input_ids": None, "token_type_ids": 0, "attention_mask": 0}  # None: the tokenizer's pad id
# torch.compile sees a handful of lengths instead of one per batch when batches pad to a multiple of this
BUCKET = 16


def collate(features: Sequence[dict], pad_id: int, multiple: int = 1, cap: int | None = None) -> dict[str, Any]:
    """Stack features into tensors padded on the right to the longest sequence in this batch, rounded up to a
    multiple of `multiple` (at most `cap`, the longest a row may be) so the lengths fall into a few buckets.

    input_ids[_a|_b] pad with `pad_id` and get an attention_mask[_a|_b] (1 = real token); token_type_ids pad
    with 0. `labels`: a list of ints per example is per-token (pads with -100), a list of floats is a multi-hot
    vector, a number is a class id (int) or a score (float). start/end_positions become tensors. Any other key
    (QA offsets, example indices) stays a Python list, one entry per example.
    """
    batch: dict[str, Any] = {}
    lengths = {}  # each side of a pair (input_ids_a, _b) pads to its own bucket
    for key in features[0]:
        base = key.removesuffix("_a").removesuffix("_b")
        if base in PADDED:
            longest = max(len(f[key]) for f in features)
            bucket = -(-longest // multiple) * multiple
            lengths[key[len(base) :]] = max(longest, bucket if cap is None else min(bucket, cap))
    for key in features[0]:
        values = [f[key] for f in features]
        base = key.removesuffix("_a").removesuffix("_b")
        if base in PADDED:
            value = pad_id if base == "input_ids" else PADDED[base]
            length = lengths[key[len(base) :]]
            batch[key] = _pad(values, value, length)
            if base == "input_ids":
                batch["attention_mask" + key[len(base) :]] = _pad([[1] * len(v) for v in values], 0, length)
        elif key == "labels":
            first = values[0]
            if isinstance(first, list) and (not first or isinstance(first[0], int)):
                batch[key] = _pad(values, -100, lengths.get(""))
            elif isinstance(first, list) or isinstance(first, float):
                batch[key] = torch.tensor(values, dtype=torch.float32)
            else:
                batch[key] = torch.tensor(values, dtype=torch.long)
        elif key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def _pad(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    T = max(length or 0, max(len(s) for s in seqs))
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def count_tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a collated batch, both sides of a bi-encoder pair included: for tokens/s."""
    return int(sum(v.sum() for k, v in batch.items() if k.startswith("attention_mask")))


class LabeledBatcher:
    """Shuffled epochs of collated batches, resumable exactly.

    Epoch e visits the examples in a permutation drawn from Random(seed + e); the state is (epoch, position), so
    a restored batcher yields the batch an uninterrupted one would. The last short batch of an epoch is kept.
    """

    def __init__(self, features: Sequence[dict], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 multiple: int = 1, cap: int | None = None):  # fmt: skip
        if not features:
            raise TinygraftError("no training examples to batch")
        if batch_size < 1:
            raise TinygraftError(f"batch size must be at least 1, got {batch_size}")
        self.features, self.batch_size, self.pad_id = list(features), batch_size, pad_id
        self.multiple, self.cap = multiple, cap  # collate's length buckets
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.features)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> dict:
        if self.position >= len(self.features):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return collate([self.features[i] for i in idx], self.pad_id, self.multiple, self.cap)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.features)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("n", len(self.features)) != len(self.features):
            raise TinygraftError(
                f"the training data has {len(self.features)} examples but the checkpoint was taken with {d['n']}"
            )
        self.epoch, self.position, self.seed = int(d["epoch"]), int(d["position"]), int(d.get("seed", self.seed))
        self._order = self._permutation(self.epoch)


def eval_batches(
    features: Sequence[dict], batch_size: int, pad_id: int, multiple: int = 1, cap: int | None = None
) -> Iterator[dict]:
    """The features in file order, collated `batch_size` at a time (predictions line up with the examples)."""
    for i in range(0, len(features), batch_size):
        yield collate(features[i : i + batch_size], pad_id, multiple, cap)
