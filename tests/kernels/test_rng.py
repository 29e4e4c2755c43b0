"""The dropout keep-mask: the Triton form (rng_triton.py) gives the torch form's bits (rng.py), and drops at rate p."""

import math

import pytest
import torch

from tinygraft.kernels import rng

triton = pytest.importorskip("triton", reason="the Triton form of the mask needs Triton")
tl = pytest.importorskip("triton.language")

from tinygraft.kernels.rng_triton import keep_mask  # noqa: E402  (after the importorskip)

BLOCK = 256


@triton.jit
def _mask_from_table(offsets_ptr, out_ptr, n, key, threshold, BLOCK: tl.constexpr):
    """Mask for int64 offsets read from memory."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    offsets = tl.load(offsets_ptr + idx, mask=ok, other=0)
    tl.store(out_ptr + idx, keep_mask(key, offsets, threshold).to(tl.int8), mask=ok)


@triton.jit
def _mask_from_base(out_ptr, base, n, key, threshold, BLOCK: tl.constexpr):
    """Mask for offsets base + i, built in registers as the kernels build them (base an int64 scalar)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    tl.store(out_ptr + idx, keep_mask(key, base + idx.to(tl.int64), threshold).to(tl.int8), mask=ok)


def _triton_mask(seed, offsets, p):
    out = torch.empty(offsets.shape, dtype=torch.int8, device=offsets.device)
    grid = (triton.cdiv(offsets.numel(), BLOCK),)
    _mask_from_table[grid](offsets, out, offsets.numel(), rng.seed_key(seed), rng.drop_threshold(p), BLOCK=BLOCK)
    return out.bool()


def _offsets(device):
    """Small indices, the 2**31 and 2**32 edges, and large random ones up to 2**62."""
    parts = [
        torch.arange(0, 300),
        torch.arange(2**31 - 150, 2**31 + 150),
        torch.arange(2**32 - 150, 2**32 + 150),
        torch.randint(2**32, 2**62, (300,)),
    ]
    return torch.cat(parts).to(device)


@pytest.mark.kernel_smoke
def test_triton_bits_equal_torch_bits(device):
    offsets = _offsets(device)
    for seed in (0, 1, 20240607, 2**31 - 1, 2**40 + 3):
        for p in (0.0, 0.1, 0.5, 0.9):
            expect = rng.keep_mask(seed, offsets, p)
            got = _triton_mask(seed, offsets, p)
            assert torch.equal(got, expect), f"seed {seed}, p {p}: {(got != expect).sum().item()} bits differ"


def test_offsets_built_in_kernel_beyond_2_32(device):
    n = 777
    for base in (0, 2**32 - 300, 5 * 2**32 + 12345):
        out = torch.empty(n, dtype=torch.int8, device=device)
        grid = (triton.cdiv(n, BLOCK),)
        _mask_from_base[grid](out, base, n, rng.seed_key(7), rng.drop_threshold(0.3), BLOCK=BLOCK)
        expect = rng.keep_mask(7, torch.arange(base, base + n, device=device), 0.3)
        assert torch.equal(out.bool(), expect), f"base {base}"


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    n = 200_000
    for seed, start in ((3, 0), (11, 2**32 - n // 2), (2**31 - 1, 2**50)):
        kept = rng.keep_mask(seed, torch.arange(start, start + n), p).sum().item()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sigma, f"seed {seed}: kept {kept} of {n} at p={p}"


def test_masks_differ_across_seeds_and_neighbours():
    offsets = torch.arange(10_000)
    a, b = rng.keep_mask(1, offsets, 0.5), rng.keep_mask(2, offsets, 0.5)
    assert 0.4 < (a != b).float().mean().item() < 0.6  # independent seeds agree about half the time
    assert 0.4 < (a[1:] != a[:-1]).float().mean().item() < 0.6  # no run structure along the index


def test_p_zero_keeps_everything_and_bad_p_is_rejected():
    assert rng.keep_mask(5, torch.arange(2**32 - 10, 2**32 + 10), 0.0).all()
    with pytest.raises(ValueError):
        rng.drop_threshold(1.0)


def test_torch_mask_equals_python_integer_hash_at_32_bit_edges():
    """The int32 tensor path against the hash written on plain Python ints (no overflow, no sign tricks)."""
    offsets = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345, 2**62 + 7]
    for seed in (0, 3, 2**33 + 1):
        for p in (0.1, 0.5):
            expected = []
            for o in offsets:
                x = rng.mix32((o & rng.MASK32) ^ rng.seed_key(seed))
                x = rng.mix32(x ^ (o >> 32))
                expected.append((x >> 8) >= rng.drop_threshold(p))
            got = rng.keep_mask(seed, torch.tensor(offsets, dtype=torch.int64), p)
            assert got.tolist() == expected


def test_keep_mask_like_is_keep_mask_over_row_major_indices():
    """The 31-bit fast path (one int32 arange, the high-word round skipped) draws the general path's bits."""
    for shape in ((1,), (7,), (3, 129), (2, 3, 7, 33)):
        n = math.prod(shape)
        for seed in (0, 9, 2**31 - 1):
            expect = rng.keep_mask(seed, torch.arange(n), 0.3).reshape(shape)
            assert torch.equal(rng.keep_mask_like(seed, shape, 0.3), expect), (shape, seed)
