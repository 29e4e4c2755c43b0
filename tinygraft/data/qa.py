"""Extractive question answering data: SQuAD JSON or span columns -> strided windows -> answers back to text.

Windows (BERT's SQuAD recipe, `transformers`' run_qa): the question (at most `max_query_length` tokens) is
repeated in every window, `[CLS] question [SEP] context piece [SEP]`; a long context is cut into pieces of the
remaining budget that overlap by `stride` tokens. Each window keeps the character span (offset) of each of its
context tokens (None for question and special tokens). Training targets: the first and last token of the first
gold answer when the window holds all of it, else both at position 0 ([CLS]).

Post-processing: per window, the best span with start <= end, both inside the context and at most
`max_answer_length` tokens long, scored start_logit + end_logit; the best over an example's windows is cut out of
the context by character offsets.

SQuAD has one public file here (dev-v1.1); `read_squad(path, split=...)` splits it by article (all questions of an
article on one side, so validation contexts are unseen), picking articles by a hash of their title: deterministic,
and independent of the order of the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygraft.data.labeled import read_rows, require_columns
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError


@dataclass
class QAExample:
    id: str
    title: str  # the article (SQuAD) or "" (table files)
    context: str
    question: str
    answers: list[str]  # gold answer texts (several annotators in SQuAD dev); empty when unlabeled
    answer_starts: list[int]  # character offset of each answer in context


# ------------------------------------------------------------------------------------------------------ reading
class Examples(list):
    """A reader's examples, and what it had to say about them (`notes`: one sentence each, for the run's warnings)."""

    def __init__(self, items=(), notes=()):
        super().__init__(items)
        self.notes = list(notes)


def locate_answer(context: str, text: str, start, where: str) -> tuple[int, bool]:
    """(the answer's character offset, moved): `start` when the answer is there, else its first occurrence in the
    context (moved), as SQuAD's own tooling reads a misplaced offset; an answer not in the context is refused."""
    try:
        start = int(start)
    except (TypeError, ValueError):
        raise TinygraftError(f"{where}: answer_start {start!r} is not a character offset") from None
    if 0 <= start and context[start : start + len(text)] == text:
        return start, False
    found = context.find(text)
    if found < 0 or not text:
        raise TinygraftError(f"{where}: the answer {text!r} is not in its context")
    return found, True


def read_squad(path: str | Path, split: str | None = None, val_fraction: float = 0.2) -> Examples:
    """Questions of a SQuAD v1.1 JSON file; `split="train"|"val"` keeps one side of the article split. Every answer
    is checked against its context (locate_answer); the answers moved are counted in the result's notes."""
    path = Path(path)
    if not path.is_file():
        raise TinygraftError(f"data file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))["data"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise TinygraftError(f"'{path}' is not a SQuAD JSON file (expected {{'data': [articles]}})") from None
    if split not in (None, "train", "val"):
        raise TinygraftError(f"unknown split {split!r} (use 'train' or 'val')")
    if not isinstance(data, list) or not all(isinstance(a, dict) for a in data):
        raise TinygraftError(f"'{path}' is not a SQuAD JSON file ('data' must be a list of articles)")
    val = split_articles([str(a.get("title", i)) for i, a in enumerate(data)], val_fraction) if split else set()
    examples, moved = [], 0
    for i, article in enumerate(data):
        title = str(article.get("title", i))
        if split is not None and (title in val) != (split == "val"):
            continue
        try:
            for para in article["paragraphs"]:
                context = para["context"]
                for qa in para["qas"]:
                    where = f"'{path}' question {qa.get('id', '?')!r}"
                    texts, starts = [], []
                    for ans in qa.get("answers", []):
                        start, was_moved = locate_answer(context, ans["text"], ans["answer_start"], where)
                        texts.append(ans["text"])
                        starts.append(start)
                        moved += was_moved
                    examples.append(QAExample(str(qa["id"]), title, context, qa["question"], texts, starts))
        except (KeyError, TypeError) as e:
            missing = f"no {e.args[0]!r}" if isinstance(e, KeyError) else "a value of the wrong kind"
            raise TinygraftError(f"'{path}' article {title!r} has {missing}; not a SQuAD v1.1 file") from None
    if not examples:
        raise TinygraftError(f"'{path}' holds no questions" + (f" in its {split} split" if split else ""))
    notes = [f"{moved} answers of '{path}' were not at their answer_start; their first occurrence in the context "
             "was used"] if moved else []  # fmt: skip
    return Examples(examples, notes)


def split_articles(titles: Sequence[str], val_fraction: float) -> set[str]:
    """Validation articles: the round(n * fraction) titles (at least 1 of 2 or more) with the smallest sha256."""
    if not 0.0 < val_fraction < 1.0:
        raise TinygraftError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    unique = sorted(set(titles), key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    n_val = max(1, round(len(unique) * val_fraction)) if len(unique) > 1 else 0
    return set(unique[:n_val])


def read_qa_table(
    path: str | Path,
    question_col: str = "question",
    context_col: str = "context",
    answer_col: str | None = "answer",
    answer_start_col: str | None = None,
    id_col: str | None = None,
    quote_none: bool = False,
) -> list[QAExample]:
    """QA examples from span columns (TSV/CSV/JSONL, Parquet, saved datasets); without an answer-start column the
    answer's first occurrence in the context is taken. A JSONL answer may be a list of accepted answers, or
    `datasets`' SQuAD column {"text": [...], "answer_start": [...]}."""
    columns, rows = read_rows(path, quote_none)
    require_columns(path, columns, [question_col, context_col, answer_col, answer_start_col, id_col])
    examples, moved = [], 0
    for line, row in rows:
        context, question = str(row[context_col]), str(row[question_col])
        answers, starts = [], []
        if answer_col is not None:
            cell, given = row[answer_col], row.get(answer_start_col) if answer_start_col else None
            if isinstance(cell, dict) and isinstance(cell.get("text"), list):  # `datasets`' SQuAD: {text, answer_start}
                cell, given = cell["text"], given if answer_start_col else cell.get("answer_start")
            answers = cell if isinstance(cell, list) else [str(cell)]
            given = given if isinstance(given, list) else [given] * len(answers)
            for text, start in zip(answers, given):
                where = f"{path} line {line}"
                if start in (None, ""):  # no offset given: the first occurrence is the answer
                    start = context.find(text)
                    if start < 0:
                        raise TinygraftError(f"{where}: the answer {text!r} is not in its context")
                else:
                    start, was_moved = locate_answer(context, str(text), start, where)
                    moved += was_moved
                starts.append(start)
        examples.append(QAExample(str(row[id_col]) if id_col else str(line), "", context, question, answers, starts))
    notes = [f"{moved} answers of '{path}' were not at their {answer_start_col}; their first occurrence in the "
             "context was used"] if moved else []  # fmt: skip
    return Examples(examples, notes)


# ----------------------------------------------------------------------------------------------------- windows
def make_qa_features(
    examples: Sequence[QAExample],
    tokenizer: TextTokenizer,
    max_length: int = 384,
    stride: int = 128,
    max_query_length: int = 64,
) -> list[dict]:
    """One feature per window: input_ids, token_type_ids, offsets (per token: (start, end) chars or None),
    example_index, and start_positions / end_positions when the example has answers."""
    feats = []
    for ex_i, ex in enumerate(examples):
        q = tokenizer.encode(ex.question)[:max_query_length]
        ctx, offsets = tokenizer.encode_with_offsets(ex.context)
        budget = max_length - len(q) - tokenizer.n_special(pair=True)
        if budget <= stride:
            raise TinygraftError(
                f"max_length={max_length} leaves {budget} context tokens per window after the question, not more "
                f"than the overlap stride={stride}; raise max_length or lower stride"
            )
        start = 0
        while True:
            end = min(start + budget, len(ctx))
            feats.append(_window(tokenizer, ex, ex_i, q, ctx, offsets, start, end))
            if end >= len(ctx):
                break
            start += budget - stride
    return feats


def _window(tokenizer, ex: QAExample, ex_i: int, q, ctx, offsets, start: int, end: int) -> dict:
    ids, types = tokenizer.build_inputs(q, ctx[start:end])
    bert = tokenizer.cls_id is not None and tokenizer.sep_id is not None  # its template ends with [SEP]
    first = len(ids) - (end - start) - int(bert)  # position of the first context token
    window_offsets: list[tuple[int, int] | None] = [None] * len(ids)
    window_offsets[first : first + end - start] = offsets[start:end]
    f = {"input_ids": ids, "token_type_ids": types, "offsets": window_offsets, "example_index": ex_i}
    if ex.answers:
        s_char = ex.answer_starts[0]
        e_char = s_char + len(ex.answers[0])
        s_tok = e_tok = 0  # [CLS]: this window does not hold the whole answer
        if end > start and offsets[start][0] <= s_char and offsets[end - 1][1] >= e_char:
            s_tok = first + next(i for i in range(start, end) if offsets[i][1] > s_char) - start
            e_tok = first + max(i for i in range(start, end) if offsets[i][0] < e_char) - start
        f["start_positions"], f["end_positions"] = s_tok, e_tok
    return f


# ------------------------------------------------------------------------------------------------- predictions
def best_span(start_logits, end_logits, offsets: Sequence, max_answer_length: int = 30):
    """(score, start token, end token) of the best valid span of one window, or None if it has no context.

    Valid: both tokens in the context (offsets not None), start <= end < start + max_answer_length.
    Scanned by span length d = end - start, so it costs T * max_answer_length, not T^2.
    """
    T = min(len(offsets), len(start_logits))
    sl = np.asarray(start_logits[:T], dtype=np.float64)
    el = np.asarray(end_logits[:T], dtype=np.float64)
    in_ctx = np.array([o is not None for o in offsets[:T]])
    if not in_ctx.any():
        return None
    sl, el = np.where(in_ctx, sl, -np.inf), np.where(in_ctx, el, -np.inf)
    best = None
    for d in range(min(max_answer_length, T)):
        scores = sl[: T - d] + el[d:]  # span (i, i + d)
        i = int(np.argmax(scores))
        if np.isfinite(scores[i]) and (best is None or scores[i] > best[0]):
            best = (float(scores[i]), i, i + d)
    return best


def postprocess_qa(
    examples: Sequence[QAExample],
    features: Sequence[dict],
    start_logits: Sequence,
    end_logits: Sequence,
    max_answer_length: int = 30,
) -> list[str]:
    """The predicted answer text of every example (in order), from its windows' logits (one 1-d array each, in
    the order of `features`; padding beyond a window's length is ignored). An example without a valid span: ""."""
    if not (len(features) == len(start_logits) == len(end_logits)):
        raise TinygraftError(f"{len(features)} QA windows but {len(start_logits)} start / {len(end_logits)} end logits")
    best: dict[int, tuple[float, int, int]] = {}
    for f, sl, el in zip(features, start_logits, end_logits):
        span = best_span(sl, el, f["offsets"], max_answer_length)
        if span is None:
            continue
        s_char, e_char = f["offsets"][span[1]][0], f["offsets"][span[2]][1]
        i = f["example_index"]
        if i not in best or span[0] > best[i][0]:
            best[i] = (span[0], s_char, e_char)
    return [examples[i].context[best[i][1] : best[i][2]].strip() if i in best else "" for i in range(len(examples))]
