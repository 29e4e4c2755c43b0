"""Token-classification (NER) data: CoNLL-style columns or JSONL token/tag lists, tags aligned to sub-words.

    CoNLL:  one token per line, columns separated by whitespace, the word first and the tag last (CoNLL-2003:
            `EU NNP B-NP B-ORG`); a blank line ends a sentence; `-DOCSTART-` lines are skipped.
    JSONL:  {"tokens": ["EU", "rejects", ...], "tags": ["B-ORG", "O", ...]} per line (column names settable).
    Arrow:  the same two list columns in Parquet or a `datasets` save_to_disk directory (data/arrow.py; ClassLabel
            tags, as CoNLL-2003's ner_tags are stored, come as their names).

Alignment (as `transformers`' token-classification recipe): the words are joined with single spaces and
tokenised once; each sub-word is assigned to the word its characters fall in. The first sub-word of a word gets
the word's tag id, continuations and special tokens get -100 (ignored by the loss), and `word_ids` keeps the
mapping so predictions return per word (`word_predictions`). A word cut off by `max_length` is predicted "O".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tinygraft.data import arrow
from tinygraft.data.labeled import (
    LabelMap,
    read_rows,
    require_columns,
)
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError


@dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str] | None  # None: unlabeled (prediction)
    line: int  # 1-based line where the sentence starts


def read_tagged(path: str | Path, tokens_col: str = "tokens", tags_col: str | None = "tags") -> list[TaggedSentence]:
    """`.jsonl` files and Arrow sources (Parquet, saved datasets) as token/tag lists, anything else as CoNLL columns;
    `tags_col=None` reads words only."""
    if arrow.is_source(path):
        sents = _read_jsonl(path, tokens_col, tags_col)
    else:
        path = Path(path)
        if not path.is_file():
            raise TinygraftError(f"data file '{path}' does not exist")
        sents = _read_jsonl(path, tokens_col, tags_col) if path.suffix == ".jsonl" else _read_conll(path, tags_col)
    if not sents:
        raise TinygraftError(f"data file '{path}' holds no sentences")
    return sents


def _read_conll(path: Path, tags_col: str | None) -> list[TaggedSentence]:
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError:
        raise TinygraftError(f"data file '{path}' is not UTF-8 text") from None
    sents, words, tags, start = [], [], [], 0
    for n, line in enumerate([*lines, ""], 1):  # the sentinel blank line closes the last sentence
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sents.append(TaggedSentence(words, tags if tags_col is not None else None, start))
            words, tags = [], []
            continue
        if tags_col is not None and len(fields) < 2:
            raise TinygraftError(f"{path} line {n} has no tag column (expected 'word ... tag')")
        if not words:
            start = n
        words.append(fields[0])
        tags.append(fields[-1])
    return sents


def _read_jsonl(path: str | Path, tokens_col: str, tags_col: str | None) -> list[TaggedSentence]:
    columns, rows = read_rows(path)
    require_columns(path, columns, [tokens_col, tags_col])
    sents = []
    for n, row in rows:
        words, tags = row.get(tokens_col), row.get(tags_col) if tags_col else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise TinygraftError(f"{path} line {n}: {tokens_col!r} must be a list of strings")
        if tags_col is not None:
            if not isinstance(tags, list) or len(tags) != len(words):
                got = len(tags) if isinstance(tags, list) else type(tags).__name__
                raise TinygraftError(f"{path} line {n}: {len(words)} tokens but {got} tags")
            tags = [str(t) for t in tags]
        sents.append(TaggedSentence(words, tags, n))
    return sents


def tag_label_map(sentences: Sequence[TaggedSentence]) -> LabelMap:
    """Tags of the training sentences, "O" first when present (then the rest in sorted order)."""
    names = sorted({t for s in sentences for t in (s.tags or [])})
    if not names:
        raise TinygraftError("the training data has no tags")
    if "O" in names:
        names.remove("O")
        names.insert(0, "O")
    return LabelMap(names)


def align_words(tokenizer: TextTokenizer, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """Sub-word ids of the space-joined words (no special tokens) and the word index of each sub-word."""
    text, spans, pos = " ".join(words), [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    char_word = [-1] * len(text)  # -1 on the joining spaces
    for i, (s, e) in enumerate(spans):
        char_word[s:e] = [i] * (e - s)
    ids, offsets = tokenizer.encode_with_offsets(text)
    word_ids = []
    for s, e in offsets:
        # first non-space character of the token's span: a byte-level BPE token "Ġword" spans the space before it
        word_ids.append(next((char_word[c] for c in range(s, e) if char_word[c] >= 0), -1))
    # a sub-word that covers no character of any word (rare: a lone normalised-away mark) joins the previous word
    for i, w in enumerate(word_ids):
        if w < 0:
            word_ids[i] = word_ids[i - 1] if i else 0
    return ids, word_ids


def encode_tagged(
    sentences: Sequence[TaggedSentence],
    tokenizer: TextTokenizer,
    max_length: int,
    label_map: LabelMap | None = None,
    source: str = "the data",
) -> list[dict]:
    """Features: input_ids, token_type_ids, word_ids (-1 on special tokens), and labels when tagged."""
    feats = []
    budget = max_length - tokenizer.n_special(pair=False)
    if budget < 1:
        raise TinygraftError(f"max_length={max_length} leaves no room for the words and the special tokens")
    for sent in sentences:
        sub_ids, word_of = align_words(tokenizer, sent.words)
        sub_ids, word_of = sub_ids[:budget], word_of[:budget]
        ids, types = tokenizer.build_inputs(sub_ids)
        lead = 1 if len(ids) > len(sub_ids) else 0  # [CLS] before the words in a BERT template
        word_ids = [-1] * len(ids)
        word_ids[lead : lead + len(word_of)] = word_of
        f = {"input_ids": ids, "token_type_ids": types, "word_ids": word_ids}
        if sent.tags is not None:
            if label_map is None:
                raise TinygraftError("tagged data needs a label map (build it from the training file)")
            tag_ids = [label_map.id(t, f"{source} line {sent.line}") for t in sent.tags]
            labels, prev = [], -1
            for w in word_ids:
                labels.append(tag_ids[w] if w >= 0 and w != prev else -100)  # first sub-word only
                if w >= 0:
                    prev = w
            f["labels"] = labels
        feats.append(f)
    return feats


def word_predictions(token_preds: Sequence[int], word_ids: Sequence[int], n_words: int, label_map: LabelMap):
    """Per-token predicted ids -> one tag per word (its first sub-word's); words lost to truncation get "O"."""
    tags = ["O"] * n_words
    seen = set()
    for p, w in zip(token_preds, word_ids):
        if w >= 0 and w not in seen:
            tags[w] = label_map.names[int(p)]
            seen.add(w)
    return tags


def dump_conll(sentences: Sequence[TaggedSentence]) -> str:
    """CoNLL text (word<space>tag lines, blank line between sentences): `predict` output and test fixtures."""
    return "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(s.words, s.tags or [])) for s in sentences) + "\n"
