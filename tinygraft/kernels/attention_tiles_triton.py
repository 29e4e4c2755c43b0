"""The tile helpers the flash-attention kernels share (attention_triton.py's forward, attention_bwd_triton.py's
backward): which query block a program owns, one key/value tile's load, which key range a query block sees
unmasked, masked or not at all, and the visibility mask itself (bounds and bottom-right causal alignment)."""

import triton
import triton.language as tl


@triton.jit
def _query_block(BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """First query row of this program. Causal: the last blocks (the most keys) first, so short ones fill the tail."""
    if CAUSAL:
        return (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    return tl.program_id(0) * BLOCK_M


@triton.jit
def _load_kv(
    K, V, offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, S, MASKED: tl.constexpr, UPCAST: tl.constexpr
):
    """One (BLOCK_N, D) tile of keys and of values; rows past S read as 0 on the ragged edge."""
    k_ptrs = K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < S, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _key_range(start_m, S, off_causal, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block at start_m: keys [0, full) are visible to every row of the block, [full, hi) need the
    mask, [hi, S) are hidden. `full` is a multiple of BLOCK_N, so the unmasked loop reads whole tiles."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + off_causal, 0), S)
        full = tl.minimum(tl.maximum(start_m + off_causal + 1, 0), S) // BLOCK_N * BLOCK_N
    else:
        hi = S
        full = S // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _visible(offs_m, offs_n, S, off_causal, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where query i may see key j: inside S and, if causal, j <= i + (S - T)."""
    visible = offs_n[None, :] < S
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + off_causal)
    return visible
