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
    # `lo ^ key`, not `key.to(...)`: a launch specializes an int argument equal to 1 into a constexpr, which has no
    # .to(); uint32 ^ int32 promotes to uint32, and the key is non-negative, so the bits are the same.
    x = _mix32(lo ^ key)
    x = _mix32(x ^ hi)
    return (x >> 8).to(tl.int32) >= threshold
