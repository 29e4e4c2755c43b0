"""Corpus reading (every input form and every bad input) and the token cache (content, split, hits, keys,
atomic writes). Every test points XDG_CACHE_HOME at its tmp_path, so nothing is written to the user's home."""

import json
import os
from pydoc_data.topics import topics

import numpy as np
import pytest

from tinygraft.data.corpus import TEXT_GLOBS, TokenCache, default_cache_dir, default_corpus, read_corpus, token_dtype
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="module")
def bpe(corpus) -> TextTokenizer:
    return TextTokenizer.train(corpus, kind="bpe", vocab_size=1000)


@pytest.fixture(scope="module")
def wordpiece(corpus) -> TextTokenizer:
    return TextTokenizer.train(corpus, kind="wordpiece", vocab_size=1000)


# ----------------------------------------------------------------------------------------- corpora
def test_default_corpus_is_pydoc_topics():
    docs = read_corpus(None)
    assert docs == default_corpus() == [topics[k] for k in sorted(topics)]
    assert sum(len(d) for d in docs) > 100_000


def test_text_file_jsonl_and_directory(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee text\n", encoding="utf-8")
    (root / "a.md").write_text("# A heading\n\nçà et là", encoding="utf-8")
    (root / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "first record", "id": 1}) + "\n\n" + json.dumps({"text": "second 🤗"}) + "\n",
        encoding="utf-8",
    )
    (root / "ignored.py").write_text("print('not a text file')")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("hidden files are skipped")
    (root / "blank.txt").write_text("   \n")  # blank documents are dropped

    assert read_corpus(root / "b.txt") == ["bee text\n"]
    assert read_corpus(str(root / "sub" / "c.jsonl")) == ["first record", "second 🤗"]
    # Sorted by relative path, recursive, only the text globs, no hidden files.
    assert read_corpus(root) == ["# A heading\n\nçà et là", "bee text\n", "first record", "second 🤗"]


def test_jsonl_with_another_text_field(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "why?", "answer": "because"}\n{"question": "how?"}\n')
    assert read_corpus(f, text_field="question") == ["why?", "how?"]


def test_missing_path_error_names_it(tmp_path):
    with pytest.raises(TinygraftError, match="does not exist") as e:
        read_corpus(tmp_path / "missing.txt")
    assert str(tmp_path / "missing.txt") in str(e.value)


def test_directory_without_text_files_names_the_globs(tmp_path):
    (tmp_path / "code.py").write_text("x = 1")
    with pytest.raises(TinygraftError, match="holds no text files") as e:
        read_corpus(tmp_path)
    assert str(tmp_path) in str(e.value) and all(glob in str(e.value) for glob in TEXT_GLOBS)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "spaces.md").write_text(" \n\t\n")
    with pytest.raises(TinygraftError, match="is empty") as e:
        read_corpus(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_jsonl_line_without_the_field_names_file_and_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"body": "wrong field"}\n')
    with pytest.raises(TinygraftError, match="line 3 .*has no 'text' field") as e:
        read_corpus(f)
    assert str(f) in str(e.value)
    f.write_text('{"text": "ok"}\nnot json at all\n')
    with pytest.raises(TinygraftError, match="line 2 .*not valid JSON"):
        read_corpus(f)
    f.write_text('{"text": 42}\n')
    with pytest.raises(TinygraftError, match="line 1 .*not a string"):
        read_corpus(f)


def test_undecodable_file_names_it(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(TinygraftError, match="not UTF-8 text") as e:
        read_corpus(tmp_path)
    assert str(f) in str(e.value)


# ----------------------------------------------------------------------------------------- token cache
def test_cache_dir_follows_xdg(cache_home, monkeypatch, tmp_path):
    assert default_cache_dir() == cache_home / "tinygraft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "tinygraft"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says to ignore relative paths
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "tinygraft"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_cache_holds_the_documents_tokens_separated(kind, corpus, bpe, wordpiece, cache_home):
    tok = bpe if kind == "bpe" else wordpiece
    cache = TokenCache.build(corpus, tok, val_fraction=0.1)
    assert cache.path.parent == cache_home / "tinygraft"
    assert cache.tokens.dtype == np.uint16 and isinstance(cache.train, np.memmap)
    sep = tok.eos_id if kind == "bpe" else tok.sep_id
    expected = [i for ids in tok.encode_batch(corpus) for i in (*ids, sep)]
    np.testing.assert_array_equal(cache.tokens, expected)
    # Split: the last 10% of tokens, contiguous, nothing lost.
    n = len(expected)
    assert len(cache.val) == round(0.1 * n) and len(cache.train) + len(cache.val) == n
    np.testing.assert_array_equal(np.concatenate([cache.train, cache.val]), expected)


def test_split_fractions_share_one_file(corpus, bpe):
    a = TokenCache.build(corpus, bpe, val_fraction=0.0)
    b = TokenCache.build(corpus, bpe, val_fraction=0.25)
    assert a.path == b.path and len(a.val) == 0 and len(b.val) == round(0.25 * len(b.tokens))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(TinygraftError, match="val_fraction"):
            TokenCache.build(corpus, bpe, val_fraction=bad)


def test_second_build_is_a_cache_hit_without_tokenising(corpus, bpe, monkeypatch, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "doc.txt").write_text("\n\n".join(corpus[:10]))
    docs = read_corpus(corpus_dir)
    first = TokenCache.build(docs, bpe)
    assert not first.hit
    assert [p.name for p in corpus_dir.iterdir()] == ["doc.txt"]  # never written beside the corpus
    mtime = os.stat(first.path).st_mtime_ns
    calls = []
    monkeypatch.setattr(TextTokenizer, "encode_batch", lambda self, texts: calls.append(texts) or [])
    second = TokenCache.build(read_corpus(corpus_dir), bpe)
    assert second.hit and calls == [] and second.key == first.key
    assert os.stat(second.path).st_mtime_ns == mtime
    np.testing.assert_array_equal(second.tokens, first.tokens)


def test_key_changes_with_corpus_and_tokenizer(corpus, bpe, wordpiece, tmp_path):
    base = TokenCache.build(corpus, bpe)
    other_tokenizer = TokenCache.build(corpus, TextTokenizer.train(corpus, kind="bpe", vocab_size=999))
    other_corpus = TokenCache.build(corpus[:-1] + [corpus[-1] + "!"], bpe)
    regrouped = TokenCache.build([corpus[0] + corpus[1], *corpus[2:]], bpe)  # same characters, other documents
    reloaded = TextTokenizer.load(bpe.save(tmp_path / "tok"))
    keys = [c.key for c in (base, other_tokenizer, other_corpus, regrouped, TokenCache.build(corpus, wordpiece))]
    assert len(set(keys)) == len(keys)
    assert TokenCache.build(corpus, reloaded).key == base.key  # the same tokenizer after save/load hits


def test_a_crash_while_writing_leaves_no_cache_file(corpus, bpe, monkeypatch, cache_home):
    real_encode = TextTokenizer.encode_batch
    calls = []

    def crash_on_second_chunk(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way through tokenising
        return real_encode(self, texts)

    many_docs = corpus * 4  # > one encode chunk, so the crash comes after bytes were written
    monkeypatch.setattr(TextTokenizer, "encode_batch", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(many_docs, bpe)
    assert list((cache_home / "tinygraft").iterdir()) == []  # neither a cache file nor a temp file
    monkeypatch.setattr(TextTokenizer, "encode_batch", real_encode)
    cache = TokenCache.build(many_docs, bpe)
    assert not cache.hit and len(cache.tokens) == 4 * len(TokenCache.build(corpus, bpe).tokens)


def test_token_dtype():
    assert token_dtype(4096) is np.uint16 and token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.uint32 and token_dtype(200_000) is np.uint32


def test_unwritable_cache_dir_is_a_tinygraft_error(corpus, bpe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(TinygraftError, match="cannot write the token cache"):
        TokenCache.build(corpus[:2], bpe, cache_dir=blocker / "tinygraft")
