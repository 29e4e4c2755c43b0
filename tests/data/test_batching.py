"""Batchers: causal windows, MLM examples and their masking statistics, exact resume, and eval windows."""

import json
import math
import random

import numpy as np
import pytest
import torch

from tinygraft.data.batching import IGNORE_INDEX, CausalLMBatcher, MLMBatcher, eval_batches
from tinygraft.data.corpus import TokenCache, default_corpus
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def wordpiece() -> TextTokenizer:
    return TextTokenizer.train(default_corpus(), kind="wordpiece", vocab_size=2000)


@pytest.fixture
def real_tokens(wordpiece, tmp_path) -> np.ndarray:
    """The default corpus as a WordPiece token stream (documents separated by [SEP])."""
    return TokenCache.build(default_corpus(), wordpiece, val_fraction=0.0, cache_dir=tmp_path / "cache").train


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """Is count a plausible Binomial(n, p) draw? |count - np| <= sigmas * sqrt(n p (1-p))."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def original_ids(batch: dict) -> torch.Tensor:
    """Undo the corruption: chosen positions hold their original id in `labels`."""
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


# ----------------------------------------------------------------------------------------- causal LM
def test_causal_windows_are_contiguous_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position, so a window shows where it came from
    batcher = CausalLMBatcher(tokens, batch_size=7, seq_len=129, seed=3)
    starts = []
    for _ in range(50):
        x, y = batcher.next()
        assert x.shape == y.shape == (7, 129) and x.dtype == y.dtype == torch.long
        torch.testing.assert_close(x, x[:, :1] + torch.arange(129))
        torch.testing.assert_close(y, x + 1)
        starts += x[:, 0].tolist()
    assert min(starts) >= 0 and max(starts) <= 1000 - 129 - 1
    assert len(set(starts)) > 200  # random starts, not a few repeated ones


def test_causal_seq_len_one_and_exact_fit():
    tokens = np.arange(8, dtype=np.uint32)
    x, y = CausalLMBatcher(tokens, batch_size=1, seq_len=7, seed=0).next()  # the only window: whole stream
    assert x.tolist() == [list(range(7))] and y.tolist() == [list(range(1, 8))]
    x, y = CausalLMBatcher(tokens, batch_size=4, seq_len=1, seed=0).next()
    assert x.shape == (4, 1) and torch.equal(y, x + 1)


def test_causal_too_short_stream_and_bad_sizes():
    with pytest.raises(TinygraftError, match="fewer than seq_len"):
        CausalLMBatcher(np.arange(10, dtype=np.uint16), batch_size=2, seq_len=10, seed=0)
    for kwargs in ({"batch_size": 0, "seq_len": 4}, {"batch_size": 2, "seq_len": -1}):
        with pytest.raises(TinygraftError, match="must be a positive integer"):
            CausalLMBatcher(np.arange(100, dtype=np.uint16), seed=0, **kwargs)


def _assert_resume_is_exact(make, same_batch):
    """Draw k batches, save the state, draw more; a fresh batcher loading the (JSON round-tripped) state must
    draw exactly the same next batches."""
    reference = make(seed=11)
    for _ in range(3):
        reference.next()
    state = json.loads(json.dumps(reference.state_dict()))  # it goes into trainer_state.json
    expected = [reference.next() for _ in range(4)]
    resumed = make(seed=999)  # a different seed: load_state_dict must restore it too
    resumed.load_state_dict(state)
    for want in expected:
        assert same_batch(resumed.next(), want)
    assert resumed.state_dict() == reference.state_dict()


def test_causal_state_dict_restores_the_exact_position():
    tokens = np.random.default_rng(0).integers(0, 50_000, size=5_000).astype(np.uint16)
    _assert_resume_is_exact(
        lambda seed: CausalLMBatcher(tokens, batch_size=5, seq_len=33, seed=seed),
        lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]),
    )
    a, b = CausalLMBatcher(tokens, 5, 33, seed=1), CausalLMBatcher(tokens, 5, 33, seed=2)
    assert not torch.equal(a.next()[0], b.next()[0])
    with pytest.raises(TinygraftError, match="keys 'seed' and 'step'"):
        a.load_state_dict({"step": 3})


def test_batchers_never_touch_the_global_rngs(wordpiece, real_tokens):
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    CausalLMBatcher(real_tokens, 4, 16, seed=0).next()
    MLMBatcher(real_tokens, 4, 16, wordpiece, seed=0).next()
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


# ----------------------------------------------------------------------------------------- eval windows
def test_eval_batches_cover_non_overlapping_windows_in_order():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=4, seq_len=129))
    n_windows = (1000 - 1) // 129  # 7: the last batch has 3 rows
    assert [x.shape[0] for x, _ in batches] == [4, 3]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x[:, 0], torch.arange(n_windows) * 129) and torch.equal(y, x + 1)
    assert torch.equal(x, torch.cat([b[0] for b in eval_batches(tokens, 4, 129)]))  # deterministic
    assert len(list(eval_batches(tokens, batch_size=2, seq_len=129, max_batches=2))) == 2
    with pytest.raises(TinygraftError, match="too few for one window"):
        list(eval_batches(tokens[:129], batch_size=2, seq_len=129))


# ----------------------------------------------------------------------------------------- MLM
def test_mlm_masking_statistics(wordpiece, real_tokens):
    """15% of the choosable tokens chosen, and 80/10/10 of those, within 5-sigma binomial bounds; special tokens
    and padding never chosen; random replacements never special."""
    batcher = MLMBatcher(real_tokens, batch_size=32, seq_len=128, tokenizer=wordpiece, seed=0)
    special = torch.tensor(sorted(wordpiece.special_ids))
    n_choosable = n_chosen = n_masked = n_random = n_kept = n_padding = 0
    for _ in range(60):
        batch = batcher.next()
        ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
        original = original_ids(batch)
        choosable = attention & ~torch.isin(original, special)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~choosable).any()  # never a special token, never padding
        assert torch.equal(ids[~chosen], original[~chosen])  # nothing else is touched
        assert not torch.isin(ids[chosen & (ids != wordpiece.mask_id)], special).any()
        n_choosable += int(choosable.sum())
        n_chosen += int(chosen.sum())
        n_masked += int((chosen & (ids == wordpiece.mask_id)).sum())
        n_kept += int((chosen & (ids == labels)).sum())
        n_random += int((chosen & (ids != labels) & (ids != wordpiece.mask_id)).sum())
        n_padding += int((~attention).sum())
    assert n_padding > 0  # some windows ended at a document boundary, so padding was there to be avoided
    assert within(n_chosen, n_choosable, 0.15)
    # A "random" replacement can draw the original token back (1 in len(ordinary ids)): it then looks kept.
    p_same = 1 / (wordpiece.vocab_size - len(wordpiece.special_ids))
    assert within(n_masked, n_chosen, 0.8)
    assert within(n_random, n_chosen, 0.1 * (1 - p_same))
    assert within(n_kept, n_chosen, 0.1 + 0.1 * p_same)


def test_mlm_examples_are_cls_chunk_sep_pad_from_one_document(wordpiece):
    # A synthetic stream whose ordinary tokens are all distinct, so every chunk can be located in it.
    rng = np.random.default_rng(0)
    ordinary = np.setdiff1d(np.arange(wordpiece.vocab_size), sorted(wordpiece.special_ids))
    body = rng.permutation(ordinary)[:1500]
    pieces, at = [], 0
    while at < len(body):
        length = int(rng.integers(1, 60))
        pieces += [*body[at : at + length], wordpiece.sep_id]
        at += length
    stream = np.array(pieces, dtype=np.uint16)
    position = {int(t): i for i, t in enumerate(stream) if t != wordpiece.sep_id}

    T = 41
    batcher = MLMBatcher(stream, batch_size=16, seq_len=T, tokenizer=wordpiece, seed=5)
    lengths = []
    for _ in range(20):
        batch = batcher.next()
        assert all(v.shape == (16, T) and v.dtype == torch.long for v in batch.values())
        assert not batch["token_type_ids"].any()
        original = original_ids(batch)
        for row, mask in zip(original.tolist(), batch["attention_mask"].tolist()):
            n_real = sum(mask)
            assert mask == [1] * n_real + [0] * (T - n_real)
            assert row[0] == wordpiece.cls_id and row[n_real - 1] == wordpiece.sep_id
            assert row[n_real:] == [wordpiece.pad_id] * (T - n_real)
            chunk = row[1 : n_real - 1]
            assert len(chunk) >= 1
            start = position[chunk[0]]
            assert stream[start : start + len(chunk)].tolist() == chunk  # contiguous in the stream
            ends_document = stream[start + len(chunk)] == wordpiece.sep_id
            assert ends_document or len(chunk) == T - 2  # cut only at a document end, or full
            lengths.append(len(chunk))
    assert min(lengths) < T - 2 and max(lengths) == T - 2


def test_mlm_stream_shorter_than_a_window_is_padded(wordpiece):
    ids = wordpiece.encode("the quick brown fox")
    stream = np.array([*ids, wordpiece.sep_id], dtype=np.uint16)
    batch = MLMBatcher(stream, batch_size=3, seq_len=64, tokenizer=wordpiece, seed=0).next()
    assert original_ids(batch)[0, : len(ids) + 2].tolist() == [wordpiece.cls_id, *ids, wordpiece.sep_id]
    assert batch["attention_mask"].sum(1).tolist() == [len(ids) + 2] * 3


def test_mlm_state_dict_restores_the_exact_position(wordpiece, real_tokens):
    _assert_resume_is_exact(
        lambda seed: MLMBatcher(real_tokens, batch_size=4, seq_len=29, tokenizer=wordpiece, seed=seed),
        lambda a, b: all(torch.equal(a[k], b[k]) for k in a),
    )


def test_mlm_bad_input(wordpiece, real_tokens):
    bpe = TextTokenizer.train(default_corpus()[:5], kind="bpe", vocab_size=300)
    with pytest.raises(TinygraftError, match=r"MLM needs .*lacks cls, sep, mask"):
        MLMBatcher(real_tokens, 2, 16, bpe, seed=0)
    with pytest.raises(TinygraftError, match="seq_len >= 3"):
        MLMBatcher(real_tokens, 2, 2, wordpiece, seed=0)
    with pytest.raises(TinygraftError, match="mask_prob"):
        MLMBatcher(real_tokens, 2, 16, wordpiece, seed=0, mask_prob=1.5)
