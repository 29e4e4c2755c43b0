"""Corpora and the token cache: text in, a memory-mapped stream of token ids out.

    read_corpus(path)  ->  list of documents (str)
    TokenCache.build(documents, tokenizer)  ->  .train / .val: 1-d uint16 (or uint32) memmaps

A corpus is a text file (one document), a JSONL file (one document per line, in a text field), a Parquet file or
a `datasets` save_to_disk directory (one document per row, in a text column; DIR:SPLIT, else its train split; see
data/arrow.py), or a directory of *.txt / *.md / *.jsonl / *.parquet files read recursively in sorted order. With
no path, the default corpus is `pydoc_data.topics`: the ~465k characters of Python documentation that ship with
every CPython.

The token cache tokenises a corpus once. The stream is `doc0 <sep> doc1 <sep> ...`, <sep> being the tokenizer's
`separator_id` (eos for GPT vocabularies, [SEP] for BERT ones). It lives under $XDG_CACHE_HOME/tinygraft (default
~/.cache/tinygraft), never beside the corpus (which may be read-only), in a file named by the sha256 of the corpus
content and of the tokenizer definition: the same pair hits the same file, a change in either misses. A file is
written to a temporary name, fsynced, then renamed into place, so a crash never leaves half a cache behind.

Train/validation split: the last `val_fraction` of the *tokens*. Splitting by tokens rather than by documents
works for a corpus that is a single document (tinyshakespeare), always gives the fraction asked for, keeps the
held-out text contiguous (no training window reaches into it), and lets one cache file serve any fraction. The
price is that one document is shared between the two splits.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tinygraft.core.jsonfile import jsonl_objects
from tinygraft.data import arrow
from tinygraft.data.labeled import require_columns
from tinygraft.data.tokenizer import TextTokenizer, tokenizer_json_sha256
from tinygraft.errors import TinygraftError

TEXT_GLOBS = ("*.txt", "*.md", "*.jsonl", "*.parquet")
CACHE_FORMAT = "tinygraft-token-cache-v1"  # bump when the file layout changes: old files then simply miss
_ENCODE_CHUNK = 256  # documents per encode_batch call: bounded memory on big corpora, still parallel in Rust


# ------------------------------------------------------------------------------------------------- corpora
def default_corpus() -> list[str]:
    """The Python documentation topics that ship with CPython (`pydoc_data.topics`), one document per topic."""
    try:
        from pydoc_data.topics import topics  # noqa: PLC0415 (some Python builds ship without pydoc_data)
    except ImportError:
        raise TinygraftError("this Python has no pydoc_data module; pass a corpus path instead") from None
    return [topics[name] for name in sorted(topics)]


def read_corpus(path: str | Path | None = None, text_field: str = "text") -> list[str]:
    """Documents of a text, JSONL or Parquet file, a saved dataset, or a directory of files; `None` gives the
    default corpus."""
    if path is None:
        return default_corpus()
    if arrow.is_source(path):  # before the checks below: DIR:SPLIT is no path on disk, a saved dataset is a directory
        documents = [doc for doc in _read_file(Path(path), text_field) if doc.strip()]
        if not documents:
            raise TinygraftError(f"corpus '{path}' is empty (it holds no non-blank text)")
        return documents
    path = Path(path)
    if not path.exists():
        raise TinygraftError(f"corpus path '{path}' does not exist")
    if path.is_dir():
        files = sorted(
            {f for glob in TEXT_GLOBS for f in path.rglob(glob) if f.is_file() and not _hidden(f, path)},
            key=lambda f: f.relative_to(path).as_posix(),
        )
        if not files:
            raise TinygraftError(f"corpus directory '{path}' holds no text files (looked for {', '.join(TEXT_GLOBS)})")
    elif path.is_file():
        files = [path]
    else:
        raise TinygraftError(f"corpus path '{path}' is neither a file nor a directory")
    documents = [doc for f in files for doc in _read_file(f, text_field) if doc.strip()]
    if not documents:
        raise TinygraftError(f"corpus '{path}' is empty (it holds no non-blank text)")
    return documents


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TinygraftError(f"corpus file '{file}' is not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise TinygraftError(f"cannot read corpus file '{file}' ({e.strerror})") from None


def _read_file(file: Path, text_field: str) -> list[str]:
    if arrow.is_source(file):  # a Parquet file, or a saved dataset (DIR[:SPLIT])
        require_columns(f"corpus '{file}'", arrow.column_names(file), [text_field])
        records = arrow.read_rows(file, columns=[text_field])[1]
    else:
        text = _read_text(file)
        if file.suffix != ".jsonl":
            return [text]
        records = jsonl_objects(text, f"corpus file '{file}'")
    documents = []
    for line_no, record in records:
        if text_field not in record:
            raise TinygraftError(f"line {line_no} of corpus file '{file}' has no {text_field!r} field")
        if not isinstance(record[text_field], str):
            raise TinygraftError(f"line {line_no} of corpus file '{file}': field {text_field!r} is not a string")
        documents.append(record[text_field])
    return documents


def corpus_sha256(documents: Iterable[str]) -> str:
    """Hash of the documents' content; each is length-prefixed so ["ab", "c"] and ["a", "bc"] differ."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- token cache
def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tinygraft, or ~/.cache/tinygraft (the XDG spec ignores a relative XDG_CACHE_HOME)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "tinygraft"


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 holds ids < 65536 (half the bytes of uint32); bigger vocabularies need uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class TokenCache:
    """A tokenised corpus on disk: `.tokens` (the whole stream), `.train` and `.val` (its two parts).

    `.hit` says whether `build` found the file already there (no tokenisation happened).
    """

    def __init__(self, path: Path, key: str, val_fraction: float = 0.1, hit: bool = False):
        self.path, self.key, self.hit = Path(path), key, hit
        self.dtype = np.dtype(self.path.suffix.lstrip("."))  # the file name ends in .uint16 or .uint32
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")  # (N,)
        n = len(self.tokens)
        n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
        if n - n_val < 1:
            raise TinygraftError(f"the corpus has only {n} tokens, too few to hold out val_fraction={val_fraction}")
        self.train = self.tokens[: n - n_val]
        self.val = self.tokens[n - n_val :]

    @classmethod
    def build(
        cls,
        documents: Iterable[str],
        tokenizer: TextTokenizer,
        val_fraction: float = 0.1,
        cache_dir: str | Path | None = None,
    ) -> TokenCache:
        """Tokenise `documents` into the cache, or reuse the file if this corpus + tokenizer was seen before."""
        if not 0 <= val_fraction < 1:
            raise TinygraftError(f"val_fraction must be in [0, 1), got {val_fraction}")
        separator = tokenizer.separator_id
        if separator is None:
            raise TinygraftError("the tokenizer has no end-of-text or [SEP] token to separate documents")
        documents = list(documents)
        key = hashlib.sha256(
            f"{CACHE_FORMAT}\n{corpus_sha256(documents)}\n{tokenizer_json_sha256(tokenizer)}".encode()
        ).hexdigest()
        dtype = token_dtype(tokenizer.vocab_size)
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = root / f"tokens-{key}.{np.dtype(dtype).name}"
        hit = path.is_file() and path.stat().st_size > 0 and path.stat().st_size % np.dtype(dtype).itemsize == 0
        if not hit:
            _write_tokens(path, documents, tokenizer, separator, dtype)
        return cls(path, key, val_fraction, hit=hit)

    def __repr__(self) -> str:
        return f"TokenCache({self.path.name}, train={len(self.train)}, val={len(self.val)}, hit={self.hit})"


def _write_tokens(path: Path, documents: list[str], tokenizer: TextTokenizer, separator: int, dtype) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise TinygraftError(
            f"cannot write the token cache in '{path.parent}' ({e.strerror}); point XDG_CACHE_HOME elsewhere"
        ) from None
    n_tokens = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, len(documents), _ENCODE_CHUNK):
                encoded = tokenizer.encode_batch(documents[start : start + _ENCODE_CHUNK])
                ids = np.fromiter(itertools.chain.from_iterable([*doc, separator] for doc in encoded), dtype=dtype)
                f.write(ids.tobytes())
                n_tokens += len(ids)
            f.flush()
            os.fsync(f.fileno())
        if n_tokens == 0:
            raise TinygraftError("the corpus has no documents to tokenise")
        os.replace(tmp, path)  # atomic: readers see either no file or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
