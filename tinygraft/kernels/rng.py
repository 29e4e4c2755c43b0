"""Counter-based random keep-masks for dropout, identical in Triton and in PyTorch.

A dropout mask is a pure function of (seed, element index): nothing is stored between forward and backward, the
kernel regenerates the mask where it needs it, and the PyTorch reference reproduces the kernel's exact bits, so
tests compare dropout paths element for element instead of skipping them.

The hash is Chris Wellons' `lowbias32` (two xorshift-multiply rounds; hash-prospector, 2018), applied to the low
32 bits of the index mixed with the seed, then to the high 32 bits. An element is kept when the top 24 bits of
the hash are at least `round(p * 2**24)`, so P(drop) = p to within 2**-24.

The Triton form lives in `rng_triton.py` (imported only when a Triton path runs); both must change together.
"""

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B


def mix32(x):
    """lowbias32 on uint32 values held in int64 (a tensor or a Python int)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32  # int64 products wrap, but their low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The per-seed key both paths mix into every index (31 bits, so Triton passes it as an int32)."""
    return mix32(int(seed) & MASK32) & 0x7FFFFFFF


def drop_threshold(p: float) -> int:
    """Integer threshold on the hash's top 24 bits: keep iff bits >= threshold."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * (1 << 24))


def _mix32_int32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place, on uint32 bit patterns stored in int32: half the memory traffic of int64 and no fresh
    buffers, so the CPU reference draws a mask faster than `bernoulli_`. int32 products wrap mod 2**32 like uint32
    ones; the masks after each right shift turn torch's arithmetic shift into the logical one the hash needs."""
    x ^= (x >> 16) & 0xFFFF
    x *= MUL1
    x ^= (x >> 15) & 0x1FFFF
    x *= MUL2 - (1 << 32)  # the same 32 bits, as a (negative) int32 constant
    x ^= (x >> 16) & 0xFFFF
    return x


def _keep(x: torch.Tensor, p: float) -> torch.Tensor:
    return ((x >> 8) & 0xFFFFFF) >= drop_threshold(p)


def keep_mask(seed: int, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, True = keep, for the given int64 element indices (any shape)."""
    offsets = offsets.to(torch.int64)
    x = (offsets & MASK32).to(torch.int32)  # the low 32 bits, reinterpreted as int32 (a fresh tensor)
    x ^= seed_key(seed)
    _mix32_int32_(x)
    x ^= (offsets >> 32).to(torch.int32)
    return _keep(_mix32_int32_(x), p)


_EAGER: dict = {}


def eagerly(fn):
    """`fn`, run outside any torch.compile graph. torch.compiler.disable is applied when dynamo first traces a call,
    not at import: it imports dynamo, which would add a second and a half to every start-up (`tinygraft --help`)."""

    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        wrapped = _EAGER.get(fn)
        if wrapped is None:
            wrapped = _EAGER[fn] = torch.compiler.disable(fn)
        return wrapped(*args, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return call


# Eager under torch.compile: the seed changes every step, so dynamo turns it into a symbolic int, and inductor's CPU
# code generator then vectorises this integer hash as float arithmetic (C++ that does not compile, torch 2.13). The
# mask is the same either way; only the multiply that applies it is worth fusing, and that stays in the graph.
@eagerly
def keep_mask_like(seed: int, shape: tuple[int, ...], p: float, device=None) -> torch.Tensor:
    """Keep-mask for a contiguous tensor of `shape`, element index = row-major position (in the global batch, under
    `global_rows`)."""
    n = 1
    for s in shape:
        n *= s
    start = _row_offset(n)
    if start + n > 2**31:
        offsets = torch.arange(start, start + n, device=device, dtype=torch.int64)
        return keep_mask(seed, offsets, p).reshape(shape)
    # Every index fits in 31 bits: the high word is 0, so the second round mixes with nothing (attention dropout
    # draws one of these per layer and step; this path is ~4x cheaper than the general one).
    x = torch.arange(start, start + n, device=device, dtype=torch.int32)
    x ^= seed_key(seed)
    return _keep(_mix32_int32_(_mix32_int32_(x)), p).reshape(shape)


# Data-parallel training (core/dist.py): a process holds rows [first, first + count) of the global batch. A mask over
# a batch-major tensor of those rows then starts at the index the same element has in the whole batch, so N
# processes drop exactly what one process drops. None: the tensor is the whole batch.
_ROWS: tuple[int, int] | None = None


def _row_offset(n: int) -> int:
    if _ROWS is None:
        return 0
    first, count = _ROWS
    return first * (n // count) if n % count == 0 else 0


def kernel_seed(seed: int) -> int:
    """The seed a Triton kernel takes. The kernels index elements from the start of their own tensor (no row
    offset yet), so under `global_rows` each process's seed is mixed with its first row: its masks are its own,
    independent of the other processes' (the same seed would give every process the same masks), though not the
    bits one process would draw for those rows, which only the PyTorch path reproduces."""
    if _ROWS is None:
        return seed
    return mix32((int(seed) ^ mix32(_ROWS[0] & MASK32)) & MASK32) & 0x7FFFFFFF


class global_rows:
    """`with global_rows(first, count):` masks drawn inside key on the global row index (forward and backward
    both: the backward regenerates masks)."""

    def __init__(self, first: int, count: int):
        self.rows = (first, count) if count else None

    def __enter__(self):
        global _ROWS
        self.saved, _ROWS = _ROWS, self.rows
        return self

    def __exit__(self, *exc):
        global _ROWS
        _ROWS = self.saved
        return False


@eagerly  # a host-side draw: run eagerly rather than warn about a graph break on `.item()`
def new_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from torch's RNG, so seeding torch makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
