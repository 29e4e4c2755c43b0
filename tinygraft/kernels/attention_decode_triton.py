"""Flash-decoding: attention for a few query rows against a long KV cache (Dao et al., "Flash-Decoding for
long-context inference", 2023).

A decode step has T = 1 query row per head (a few, when a prompt is extended in small pieces). The forward kernel
gives each (batch, head) one program of BLOCK_M rows, so at T = 1 it runs B * Hq programs that each walk all S keys
with one useful row of 128: the GPU sits mostly idle and every query head of a group reads the same keys again.
Here the keys are split instead, and the query heads of a group share their key/value reads:

    split kernel, one program per (chunk of keys, batch, key/value head): its rows are the GROUPS * T query rows
        that read this key/value head (row r: query head hk * GROUPS + r // T, position r % T), and over its chunk
        it keeps the forward's online softmax, writing the normalised partial output o_c and its log2-sum-exp l_c
        (-inf for a chunk with no visible key)
    combine kernel, one program per query row:
        M = max_c l_c,  w_c = 2^(l_c - M),  O = sum_c w_c o_c / sum_c w_c,  LSE = M + log2(sum_c w_c)

which is the softmax over all keys, in the forward's LSE convention (log2-based, +inf for a row that sees no key),
so the ordinary backward kernels take it from here. No dropout: the dispatcher sends dropout to the forward kernel.
Chunks are multiples of CHUNK_QUANTUM keys, so the grid does not depend on the BLOCK_N autotuning picks.
"""

import functools

import torch
import triton
import triton.language as tl

from tinygraft.kernels import backend, launch

MAX_ROWS = 64  # query rows per program (GROUPS * T): more, and the forward kernel's tiles are the better fit
MAX_T = 16
MAX_SPLITS = 64
CHUNK_QUANTUM = 256


@triton.jit
def _attn_decode(
    Q, K, V, Opart, Lpart, Pad,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb,
    Hkv, GROUPS, T, S, CHUNK, SPLITS, qk_scale,
    S_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    pid = tl.program_id(1)  # b * Hkv + hk
    b = (pid // Hkv).to(tl.int64)
    hk = (pid % Hkv).to(tl.int64)
    R = GROUPS * T
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < R
    head = hk * GROUPS + rows // T
    t = rows % T
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Pad += b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, S)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        inside = offs_n < hi
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=inside[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=inside[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
        visible = inside[None, :] & row_ok[:, None]
        if CAUSAL:  # bottom-right: row at position t sees keys j <= t + (S - T)
            visible = visible & (offs_n[None, :] <= t[:, None] + (S - T))
        if HAS_PAD:
            visible = visible & (tl.load(Pad + offs_n, mask=inside, other=0) != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (pid.to(tl.int64) * SPLITS + split) * R + rows  # (B * Hkv, SPLITS, R) rows of the partials
    tl.store(Lpart + part, lse, mask=row_ok)
    tl.store(Opart + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None])


@triton.jit
def _attn_decode_combine(
    Opart, Lpart, Out, Lse,
    stride_ob, stride_oh, stride_ot, stride_od,
    Hkv, GROUPS, T, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    pid = tl.program_id(1)
    R = GROUPS * T
    b = (pid // Hkv).to(tl.int64)
    head = (pid % Hkv).to(tl.int64) * GROUPS + r // T
    t = r % T
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = (pid.to(tl.int64) * SPLITS + offs_s) * R + r
    lse = tl.load(Lpart + part, mask=offs_s < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_use)  # 0 for chunks that saw no key
    den = tl.sum(w, 0)
    o = tl.load(Opart + part[:, None] * HEAD_DIM + offs_d[None, :], mask=(offs_s < SPLITS)[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + b * stride_ob + head * stride_oh + t * stride_ot + offs_d * stride_od, out.to(Out.dtype.element_ty))
    total = tl.where(den > 0.0, m_use + tl.math.log2(tl.where(den > 0.0, den, 1.0)), float("inf"))
    tl.store(Lse + (b * Hkv * GROUPS + head) * T + t, total)


def _configs(shapes):
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


# (BLOCK_N, warps, stages) in order of preference, per head dim: a decode step streams K and V once, so wide key
# tiles with a deep pipeline keep the loads in flight; the rows are few, so 4 warps suffice.
_CONFIGS = {
    "16bit": {128: _configs([(64, 4, 3), (128, 4, 3), (32, 4, 4)]), 64: _configs([(128, 4, 3), (64, 4, 4)])},
    "fp32": {128: _configs([(32, 4, 2)]), 64: _configs([(32, 4, 2)])},
}
_INTERPRET = {"BLOCK_N": 32}
_KEY = ["HEAD_DIM", "BLOCK_M", "CAUSAL", "HAS_PAD", "S_BUCKET"]


def eligible(T: int, groups: int, dropout_p: float) -> bool:
    """Whether the decode path serves this call: few query rows per key/value head, no dropout."""
    return dropout_p == 0.0 and T <= MAX_T and groups * T <= MAX_ROWS


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits_for(B: int, Hkv: int, S: int, device: torch.device) -> tuple[int, int]:
    """(number of key chunks, keys per chunk): enough programs to fill the GPU, chunks of whole quanta."""
    if backend.interpreting() or device.type != "cuda":
        target, quantum = 4, 64  # small, so the tests run several chunks and the combine
    else:
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target, quantum = triton.cdiv(target, B * Hkv), CHUNK_QUANTUM
    splits = max(1, min(target, MAX_SPLITS, triton.cdiv(S, quantum)))
    chunk = max(quantum, triton.cdiv(triton.cdiv(S, splits), quantum) * quantum)
    return max(1, triton.cdiv(S, chunk)), chunk


def _kernel(head_dim: int, dtype: torch.dtype, shape_class: str):
    if backend.interpreting():
        return _attn_decode, _INTERPRET
    configs = _CONFIGS["fp32" if dtype == torch.float32 else "16bit"][128 if head_dim == 128 else 64]
    return launch.autotuned("attention.decode", shape_class, _attn_decode, configs, _KEY)


def forward(q, k, v, pad, stride_pb, has_pad, causal, qk_scale, dot_flags, shape_class, s_bucket):
    """(out (B, Hq, T, D) in q's dtype, lse (B, Hq, T) fp32): the forward kernel's results, by split keys."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    R = groups * T
    splits, chunk = splits_for(B, Hkv, S, q.device)
    opart = torch.empty((B * Hkv, splits, R, D), device=q.device, dtype=torch.float32)
    lpart = torch.empty((B * Hkv, splits, R), device=q.device, dtype=torch.float32)
    out = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    kernel, blocks = _kernel(D, q.dtype, shape_class)
    kernel[(splits, B * Hkv)](
        q, k, v, opart, lpart, pad, *q.stride(), *k.stride(), *v.stride(), stride_pb,
        Hkv, groups, T, S, chunk, splits, qk_scale, s_bucket,
        HEAD_DIM=D, CAUSAL=causal, HAS_PAD=has_pad, BLOCK_M=max(16, triton.next_power_of_2(R)), **dot_flags, **blocks,
    )  # fmt: skip
    _attn_decode_combine[(R, B * Hkv)](
        opart, lpart, out, lse, *out.stride(), Hkv, groups, T, splits,
        HEAD_DIM=D, BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=4,
    )  # fmt: skip
    return out, lse
