"""Triton form of `rng.keep_mask` (same bits; see rng.py for the hash and why)."""

import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def keep_mask(key, offsets, threshold):
    """True = keep. `key` is rng.seed_key(seed), `offsets` int64 element indices, `threshold` rng.drop_threshold(p)."""
    offsets = offsets.to(tl.int64)
    lo = (offsets & 0xFFFFFFFF).to(tl.uint32)
    hi = (offsets >> 32).to(tl.uint32)
    x = _mix32(lo ^ key.to(tl.uint32))
    x = _mix32(x ^ hi)
    return (x >> 8).to(tl.int32) >= threshold
