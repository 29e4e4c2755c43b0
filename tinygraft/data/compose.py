"""Batchers made of batchers: mixtures (several tasks in one run; replay of old data beside new) and a rank's
slice of each batch (one process of several), all resumable exactly.

Every batcher in tinygraft has the same three methods: `next()` the next batch, `state_dict()` its position as
plain JSON, `load_state_dict(state)` to go back there. A restored batcher yields the batch an uninterrupted one
would, so these wrappers keep that property by storing their own position beside their children's.

    MixtureBatcher([new, replay], weights=[0.8, 0.2], seed=0)   batch n comes from child i with probability w_i,
                                                                drawn from (seed, n) alone
    ReplayMix(new, old, ratio=0.25, batch_size=16)              every batch: a fraction `ratio` of its rows from
                                                                `old` (replay), the rest from `new`
    RankSlice(batcher, rank, world)                             the rows rank::world of every batch
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tinygraft.errors import TinygraftError


class MixtureBatcher:
    """Each batch from one of several batchers, chosen at random with fixed weights; the choice for batch n is a
    function of (seed, n) only, so the position is n plus each child's own."""

    def __init__(self, batchers: Sequence, weights: Sequence[float], seed: int = 0):
        if not batchers or len(batchers) != len(weights):
            raise TinygraftError(f"a mixture needs one weight per batcher; got {len(batchers)} and {len(weights)}")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise TinygraftError(f"mixture weights must be non-negative with a positive sum, got {list(weights)}")
        self.batchers, self.p, self.seed, self.step = list(batchers), w / w.sum(), int(seed), 0
        self.counts = [0] * len(self.batchers)  # batches drawn from each child (a readout for logs)

    def choice(self, step: int) -> int:
        return int(np.random.default_rng([self.seed, step, 0x6D6978]).choice(len(self.p), p=self.p))

    def next(self):
        i = self.choice(self.step)
        self.step += 1
        self.counts[i] += 1
        return self.batchers[i].next()

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "step": self.step,
            "counts": list(self.counts),
            "children": [b.state_dict() for b in self.batchers],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("children", [])) != len(self.batchers):
            raise TinygraftError(
                f"the mixture's saved state holds {len(state.get('children', []))} batchers, this "
                f"one {len(self.batchers)}"
            )
        self.seed, self.step, self.counts = int(state["seed"]), int(state["step"]), list(state["counts"])
        for b, s in zip(self.batchers, state["children"]):
            b.load_state_dict(s)


class ReplayMix:
    """Rows of two batchers in every batch: k_n = floor((n+1)·r·B) - floor(n·r·B) rows of batch n come from `old`,
    the other B - k_n from `new`. The running total of replayed rows is floor(N·r·B) after N batches, so any window
    holds r of its rows from `old` to within one row (exactly, when r·B is whole). Both children make a batch every
    step and the rows past the share are dropped: the position stays (n, each child's), and a child's batch never
    depends on how many of its rows were used."""

    def __init__(self, new, old, ratio: float, batch_size: int):
        if not 0 < ratio < 1:
            raise TinygraftError(f"the replay ratio must lie between 0 and 1 (exclusive), got {ratio}")
        self.new, self.old, self.ratio, self.batch_size, self.step = new, old, float(ratio), int(batch_size), 0

    def replayed(self, step: int) -> int:
        """Rows of batch `step` from `old`."""
        share = self.ratio * self.batch_size
        return int(np.floor((step + 1) * share + 1e-9) - np.floor(step * share + 1e-9))

    def next(self):
        k = self.replayed(self.step)
        self.step += 1
        a, b = self.new.next(), self.old.next()
        return join(rows(a, slice(0, self.batch_size - k)), rows(b, slice(0, k)))

    def state_dict(self) -> dict:
        return {"step": self.step, "new": self.new.state_dict(), "old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"step", "new", "old"}:
            raise TinygraftError(f"a replay mixture's state has keys step, new and old; got {sorted(state)}")
        self.step = int(state["step"])
        self.new.load_state_dict(state["new"])
        self.old.load_state_dict(state["old"])


def join(a, b):
    """Two batches of one layout stacked along rows (tensors, tuples of tensors, dicts of them)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: join(a[k], b[k]) for k in a}
    if isinstance(a, list) and not all(isinstance(v, torch.Tensor) for v in a):
        return a + b  # per-row values (example indices)
    return type(a)(join(x, y) for x, y in zip(a, b))


def rows(batch, index: slice):
    """The rows `index` of a batch: a tensor, a tuple/list of tensors, or a dict of them (lists sliced too)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: rows(v, index) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(rows(v, index) for v in batch)
    if isinstance(batch, list):
        return batch[index]
    return batch


class RankSlice:
    """Rank `rank` of `world` processes: the rows rank, rank + world, ... of every batch of `batcher`. Every rank
    draws the same global batch (the batchers are seeded by position), so together they read each row once."""

    def __init__(self, batcher, rank: int, world: int):
        if not 0 <= rank < world:
            raise TinygraftError(f"rank {rank} is not one of the {world} processes (0 .. {world - 1})")
        self.batcher, self.rank, self.world = batcher, rank, world

    def next(self):
        return rows(self.batcher.next(), slice(self.rank, None, self.world))

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state)
