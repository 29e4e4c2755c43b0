"""Batchers: turn a token stream (a 1-d uint16/uint32 array, e.g. `TokenCache.train`) into model inputs.

    CausalLMBatcher  GPT pre-training: random windows x = t[s : s+T], y = t[s+1 : s+T+1].
    MLMBatcher       BERT pre-training: `[CLS] chunk [SEP] [PAD]...`, 15% of the real tokens chosen for the
                     loss, of those 80% -> [MASK], 10% -> a random token, 10% unchanged (Devlin et al. 2019, 3.1).
    eval_batches     validation: every non-overlapping window once, in order (the same val loss on every call).

Randomness and resuming: batch number `step` draws all its random numbers from its own numpy Generator seeded
with (seed, step). So a batcher's whole position is the pair (seed, step): `state_dict()` is two integers,
`load_state_dict` restores them, and the next batch is exactly the one an uninterrupted run would have drawn.
The global RNGs (python, numpy, torch) are never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Integral

import numpy as np
import torch

from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError

IGNORE_INDEX = -100  # labels the loss skips (torch cross_entropy's default ignore_index)


def _batch_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def _check_sizes(batch_size: int, seq_len: int, seed: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, Integral) or value < 1:
            raise TinygraftError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, Integral) or seed < 0:
        raise TinygraftError(f"seed must be a non-negative integer, got {seed!r}")


class _SeededBatcher:
    """The (seed, step) position shared by both random batchers."""

    seed: int
    step: int

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"seed", "step"}:
            raise TinygraftError(f"batcher state must have keys 'seed' and 'step', got {sorted(state)}")
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()


class CausalLMBatcher(_SeededBatcher):
    """Random windows of a token stream for next-token prediction."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        _check_sizes(batch_size, seq_len, seed)
        if len(tokens) < seq_len + 1:
            raise TinygraftError(
                f"the token stream has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter seq_len or a bigger corpus"
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.step = int(seed), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (B, T) int64, y shifted one to the left of x."""
        rng = _batch_rng(self.seed, self.step)
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # last start: N - T - 1
        self.step += 1
        return _windows(self.tokens, starts, self.seq_len)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)  # (B, T+1)
    return torch.from_numpy(chunk[:, :-1].copy()), torch.from_numpy(chunk[:, 1:].copy())


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows from the start of `tokens`, in order; the last batch may have fewer rows."""
    _check_sizes(batch_size, seq_len, 0)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise TinygraftError(
            f"the validation tokens ({len(tokens)}) are too few for one window of seq_len={seq_len}; "
            "use a shorter seq_len or a larger val_fraction"
        )
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        yield _windows(tokens, starts, seq_len)


class MLMBatcher(_SeededBatcher):
    """Masked-language-model examples from random windows of a token stream.

    Each example is `[CLS] chunk [SEP]` padded to seq_len: the chunk is up to seq_len - 2 tokens from a random
    start, cut at the end of its document (the stream's separator), so an example never mixes two documents
    and short ones are padded. Only real, non-special tokens can be chosen for the loss.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        tokenizer: TextTokenizer,
        seed: int = 0,
        mask_prob: float = 0.15,
    ):
        _check_sizes(batch_size, seq_len, seed)
        if seq_len < 3:
            raise TinygraftError(f"an MLM example needs seq_len >= 3 ([CLS] token [SEP]), got {seq_len}")
        if not 0 < mask_prob < 1:
            raise TinygraftError(f"mask_prob must be in (0, 1), got {mask_prob}")
        missing = [n for n in ("cls", "sep", "mask", "pad") if getattr(tokenizer, f"{n}_id") is None]
        if missing:
            raise TinygraftError(
                f"MLM needs a tokenizer with [CLS], [SEP], [MASK] and [PAD]; this {tokenizer.kind} one lacks "
                + ", ".join(missing)
            )
        if len(tokens) < 1:
            raise TinygraftError("the token stream is empty")
        self.tokens, self.batch_size, self.seq_len, self.mask_prob = tokens, batch_size, seq_len, mask_prob
        self.seed, self.step = int(seed), 0
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = (
            tokenizer.cls_id,
            tokenizer.sep_id,
            tokenizer.mask_id,
            tokenizer.pad_id,
        )
        self.doc_sep = tokenizer.separator_id
        self.special_ids = np.array(sorted(tokenizer.special_ids), dtype=np.int64)
        # Random replacements come from the ordinary vocabulary: injecting [CLS] or [PAD] mid-text teaches nothing.
        self.ordinary_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int64), self.special_ids)

    def next(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (1 = real token), token_type_ids (zeros), labels (-100 = not chosen); (B, T)."""
        B, T, n = self.batch_size, self.seq_len, len(self.tokens)
        rng = _batch_rng(self.seed, self.step)
        self.step += 1
        L = min(T - 2, n)  # chunk length before cutting at the document end
        starts = rng.integers(0, n - L + 1, size=B)
        # A window that starts on a separator would be empty: start one token later instead.
        starts = np.minimum(starts + (self.tokens[starts] == self.doc_sep), n - L)
        window = np.asarray(self.tokens[starts[:, None] + np.arange(L)], dtype=np.int64)  # (B, L)
        at_sep = window == self.doc_sep
        lengths = np.where(at_sep.any(axis=1), at_sep.argmax(axis=1), L)  # (B,) tokens before the document ends

        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        input_ids[:, 0] = self.cls_id
        input_ids[:, 1 : L + 1] = np.where(np.arange(L) < lengths[:, None], window, self.pad_id)
        input_ids[np.arange(B), lengths + 1] = self.sep_id
        attention_mask = np.arange(T) < (lengths[:, None] + 2)  # [CLS] + chunk + [SEP]

        # 15% of real non-special tokens are chosen; of those 80% -> [MASK], 10% -> random token, 10% unchanged.
        can_choose = attention_mask & ~np.isin(input_ids, self.special_ids)
        chosen = can_choose & (rng.random((B, T)) < self.mask_prob)
        labels = np.where(chosen, input_ids, IGNORE_INDEX)
        action = rng.random((B, T))
        random_ids = self.ordinary_ids[rng.integers(0, len(self.ordinary_ids), size=(B, T))]
        input_ids = np.where(chosen & (action < 0.8), self.mask_id, input_ids)
        input_ids = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, input_ids)

        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
            "token_type_ids": torch.zeros((B, T), dtype=torch.long),
            "labels": torch.from_numpy(labels),
        }
