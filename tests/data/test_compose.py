"""Batchers made of batchers: a mixture draws each batch from one child with fixed weights and resumes exactly; a
rank's slice takes its rows of every batch, the ranks together reading each row once."""

import numpy as np
import pytest
import torch

from tinygraft.data.batching import CausalLMBatcher
from tinygraft.data.compose import MixtureBatcher, RankSlice, ReplayMix
from tinygraft.data.labeled import LabeledBatcher
from tinygraft.errors import TinygraftError

TOKENS = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16)


def children():
    feats = [{"input_ids": list(range(1, 2 + i % 7)), "labels": i % 3} for i in range(29)]
    return [CausalLMBatcher(TOKENS, 4, 8, seed=1), LabeledBatcher(feats, 4, 0, seed=2)]


def kind(batch) -> int:
    return 0 if isinstance(batch, tuple) else 1


def test_mixture_follows_its_weights_and_resumes_exactly():
    mix = MixtureBatcher(children(), [0.75, 0.25], seed=3)
    picks = [kind(mix.next()) for _ in range(400)]
    share = picks.count(0) / len(picks)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 400) ** 0.5  # within four binomial standard deviations
    assert mix.counts == [picks.count(0), picks.count(1)]
    state = mix.state_dict()
    straight = [mix.next() for _ in range(7)]
    again = MixtureBatcher(children(), [0.75, 0.25], seed=3)
    again.load_state_dict(state)
    for a, b in zip(straight, [again.next() for _ in range(7)]):
        assert kind(a) == kind(b)
        pairs = zip(a, b) if isinstance(a, tuple) else ((a[k], b[k]) for k in a)
        assert all(torch.equal(x, y) for x, y in pairs)


def test_mixture_refuses_bad_weights_and_a_state_of_another_mixture():
    with pytest.raises(TinygraftError, match="one weight per batcher"):
        MixtureBatcher(children(), [1.0])
    with pytest.raises(TinygraftError, match="non-negative with a positive sum"):
        MixtureBatcher(children(), [0.0, -1.0])
    state = MixtureBatcher(children(), [1, 1]).state_dict()
    with pytest.raises(TinygraftError, match="holds 2 batchers, this one 1"):
        MixtureBatcher(children()[:1], [1]).load_state_dict(state)


def test_rank_slices_partition_every_batch():
    world = 3
    ranks = [
        RankSlice(LabeledBatcher([{"input_ids": [i + 1], "labels": i} for i in range(7)], 7, 0), r, world)
        for r in range(world)
    ]
    parts = [r.next() for r in ranks]
    labels = sorted(int(v) for p in parts for v in p["labels"])
    assert labels == list(range(7)) and [len(p["labels"]) for p in parts] == [3, 2, 2]
    x0, _ = RankSlice(CausalLMBatcher(TOKENS, 5, 8, seed=1), 1, 2).next()
    assert x0.shape == (2, 8)
    with pytest.raises(TinygraftError, match="rank 3 is not one of the 3 processes"):
        RankSlice(ranks[0].batcher, 3, 3)


OLD = np.random.default_rng(1).integers(1000, 1050, 5000).astype(np.uint16)  # another domain: ids >= 1000


def replay(ratio: float, batch: int = 7) -> ReplayMix:
    return ReplayMix(CausalLMBatcher(TOKENS, batch, 5, seed=4), CausalLMBatcher(OLD, batch, 5, seed=5), ratio, batch)


@pytest.mark.parametrize("ratio, batch", [(0.25, 8), (0.25, 7), (0.1, 1), (0.6, 13)])
def test_replay_mix_holds_its_ratio_over_every_window_and_resumes_exactly(ratio, batch):
    mix = replay(ratio, batch)
    old_rows = []
    for _ in range(60):
        x, y = mix.next()
        assert x.shape == y.shape == (batch, 5)
        from_old = (x >= 1000).all(1)
        assert torch.equal(from_old, (x >= 1000).any(1))  # a row is one domain's, whole
        assert not from_old[: batch - int(from_old.sum())].any()  # new rows first, then the replayed ones
        old_rows.append(int(from_old.sum()))
    for start in range(0, 60, 9):  # any window: within one row of ratio · rows
        for end in range(start + 1, 61, 11):
            assert abs(sum(old_rows[start:end]) - ratio * batch * (end - start)) < 1 + 1e-9
    assert sum(old_rows) == int(np.floor(60 * ratio * batch + 1e-9))  # the running total is exact
    state = mix.state_dict()
    straight = [mix.next() for _ in range(5)]
    again = replay(ratio, batch)
    again.load_state_dict(state)
    for a, b in zip(straight, [again.next() for _ in range(5)]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_replay_mix_stacks_dict_batches_and_refuses_bad_ratios():
    feats = [{"input_ids": list(range(1, 5)), "labels": i % 3} for i in range(20)]
    mix = ReplayMix(LabeledBatcher(feats, 4, 0, seed=1), LabeledBatcher(feats, 4, 0, seed=2), 0.5, 4)
    batch = mix.next()
    assert all(v.shape[0] == 4 for v in batch.values() if isinstance(v, torch.Tensor))
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(TinygraftError, match="between 0 and 1"):
            replay(bad)
    with pytest.raises(TinygraftError, match="keys step, new and old"):
        replay(0.5).load_state_dict({"step": 1})
