"""Flash attention in Triton: the FlashAttention-2 forward and backward (Dao, 2023, arXiv:2307.08691).

The math (S_len keys, scale = softmax_scale; see attention.py for the masks and the dropout index):

    forward, one block of query rows at a time, key tiles j streamed through SRAM:
        s = scale * q k_j^T  (masked -> -inf),   m' = max(m, rowmax s),   p = exp(s - m')
        l = l e^(m - m') + rowsum p,             acc = acc e^(m - m') + (p * keep / (1 - p_drop)) v_j
        O = acc / l,   LSE = m + log l           only O and LSE are written; the (T x S) scores never are
    backward, recomputing p = exp(s - LSE) tile by tile:
        delta = rowsum(dO * O)                   (a preprocess kernel; equals rowsum(dP * P) even with dropout)
        dV += (P * keep / (1 - p_drop))^T dO      dP = (dO V^T) * keep / (1 - p_drop)
        dS = P * (dP - delta)                    dQ = scale dS K,   dK = scale dS^T Q

Scores live in base 2 (scale * log2 e folded in, exp2 on the hardware's fast path), so the saved LSE is
log2-based. A row with no visible key keeps m = -inf and l = 0: its output is 0 and its LSE is stored as +inf,
which makes every recomputed p of that row exp2(s - inf) = 0 and so its gradients 0, with no NaN anywhere.

Work split: the forward and dQ kernels own a block of query rows of one query head and walk the key tiles; the
dK/dV kernel owns a block of keys of one key/value head and walks the query tiles of every query head in its
group, so grouped-query gradients are summed in registers, with no atomics. Each walk is cut in two: the tiles
every row fully sees run without any mask arithmetic; the causal diagonal and the ragged edge run masked; tiles
a causal mask hides entirely are never visited.

Files: this one holds the forward kernel, the launchers and the custom ops; attention_bwd_triton.py the backward
kernels, attention_tiles_triton.py the tile helpers both share, attention_decode_triton.py the decode path.

Launch: autotuned block sizes on CUDA (keyed on head dim, causal, T and S buckets; Hopper-friendly 128 x 64/128
tiles among them), one small fixed configuration under TRITON_INTERPRET=1. Under the interpreter bf16 tiles are
upcast to fp32 before tl.dot (triton-lang/triton#11584); on a GPU bf16/fp16 operands feed the tensor cores with
fp32 accumulation, and fp32 inputs use IEEE or TF32 dots as torch's matmul setting says.
"""

import math

import torch
import triton
import triton.language as tl

from tinygraft.kernels import attention_decode_triton, backend, launch, rng
from tinygraft.kernels.attention_bwd_triton import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
from tinygraft.kernels.attention_tiles_triton import _key_range, _load_kv, _query_block, _visible
from tinygraft.kernels.rng_triton import keep_mask

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    Pad,
    start_n,
    offs_m,
    offs_d,
    drop_base,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    S,
    off_causal,
    qk_scale,
    seed_key,
    drop_threshold,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv(K, V, offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, S, MASKED, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        visible = _visible(offs_m, offs_n, S, off_causal, CAUSAL)
        s = tl.where(visible, s, float("-inf"))
    if HAS_PAD:
        keep_key = tl.load(Pad + offs_n, mask=offs_n < S, other=0) != 0
        s = tl.where(keep_key[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet: avoid -inf - -inf
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        offs = drop_base + offs_m[:, None].to(tl.int64) * S + offs_n[None, :]
        p = tl.where(keep_mask(seed_key, offs, drop_threshold), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    Pad,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_pb,
    Hq,
    GROUPS,
    T,
    S,
    qk_scale,
    seed_key,
    drop_threshold,
    inv_keep,
    T_BUCKET,
    S_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = _query_block(BLOCK_M, CAUSAL)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUPS
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    Pad += b.to(tl.int64) * stride_pb
    drop_base = pid_bh.to(tl.int64) * T * S

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    off_causal = S - T
    full, hi = _key_range(start_m, S, off_causal, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            Pad,
            start_n,
            offs_m,
            offs_d,
            drop_base,
            stride_ks,
            stride_kd,
            stride_vs,
            stride_vd,
            S,
            off_causal,
            qk_scale,
            seed_key,
            drop_threshold,
            CAUSAL,
            HAS_PAD,
            DROPOUT,
            False,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
        )
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            Pad,
            start_n,
            offs_m,
            offs_d,
            drop_base,
            stride_ks,
            stride_kd,
            stride_vs,
            stride_vd,
            S,
            off_causal,
            qk_scale,
            seed_key,
            drop_threshold,
            CAUSAL,
            HAS_PAD,
            DROPOUT,
            True,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
        )

    seen = l_i > 0.0
    out = acc * (inv_keep / tl.where(seen, l_i, 1.0))[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)
    o_ptrs = Out + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < T)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: block sizes, grids, strides.


def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), per head dim (128, or 64 and below), in order of preference: the first
# that builds within a target's limits is what launch_configs.json commits for it (the compile check prunes the
# rest per target: the 128 x 128 forward at D = 128 needs 224 KB, past the A100's 163 KB). The forward's 128 x 64/128
# tiles with 4-8 warps and 2-3 stages are what Hopper's wgmma path likes; the dK/dV kernel holds a key block
# (BLOCK_N) and streams query blocks (BLOCK_M), the dQ kernel the other way round, as in Triton's fused-attention
# tutorial. Four each, so the check can build every one under both Tritons within CI's time. Untimed on a GPU.
_CONFIGS = {
    "fwd": {128: _configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]),
            64: _configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)])},
    "dkdv": {128: _configs([(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)]),
             64: _configs([(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 4)])},
    "dq": {128: _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]),
           64: _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)])},
}  # fmt: skip
# fp32: IEEE dots are FMA loops, not tensor-core MMAs, and hold whole tiles of products in registers. The compile
# check's scan of 16-64 row and key blocks kept these as the largest that spill nothing on sm_80 and sm_90 (64 x 64
# at D = 64 spilled 9 KB per thread).
_FP32_CONFIGS = {
    "fwd": {128: _configs([(32, 32, 8, 2)]), 64: _configs([(64, 32, 8, 2)])},
    "dkdv": {128: _configs([(16, 16, 4, 2)]), 64: _configs([(32, 32, 8, 2)])},
    "dq": {128: _configs([(16, 64, 8, 2)]), 64: _configs([(32, 32, 8, 2)])},
}
_KEY = ["HEAD_DIM", "CAUSAL", "HAS_PAD", "DROPOUT", "T_BUCKET", "S_BUCKET"]
# Under the interpreter: small unequal blocks, so the tests walk ragged edges and causal diagonals of both shapes.
_INTERPRET = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32},
}
_DELTA_BLOCK_M = 64


def shape_class(head_dim: int, dtype: torch.dtype) -> str:
    """The unit a candidate list (and launch_configs.json) is kept by: "d128-16bit", "d64-fp32"."""
    return f"d{128 if head_dim == 128 else 64}-{'fp32' if dtype == torch.float32 else '16bit'}"


def _kernel(name: str, head_dim: int, dtype: torch.dtype):
    """(kernel, extra launch kwargs): the committed or autotuned config on a GPU, fixed blocks under the interpreter."""
    plain = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[name]
    if backend.interpreting():
        return plain, _INTERPRET[name]
    dims = 128 if head_dim == 128 else 64
    configs = (_FP32_CONFIGS if dtype == torch.float32 else _CONFIGS)[name][dims]
    return launch.autotuned(f"attention.{name}", shape_class(head_dim, dtype), plain, configs, _KEY)


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(n), 16384)


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = backend.upcast_bf16_dots(dtype)
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return {"UPCAST": upcast, "DOT_PRECISION": "ieee" if (ieee or upcast) else "tf32"}


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    if dropout_p == 0.0:
        return 0, 0, 1.0
    return rng.seed_key(seed), rng.drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _pad_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0  # never read: HAS_PAD is False
    pad = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    return pad, pad.stride(0)


def _forward(q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed):
    """(out, lse): by split keys for a few query rows (a decode step), else one program per block of query rows."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    pad, stride_pb = _pad_args(key_padding_mask, q)
    has_pad = key_padding_mask is not None
    if q.numel() and attention_decode_triton.eligible(T, Hq // Hkv, dropout_p):
        return attention_decode_triton.forward(
            q, k, v, pad, stride_pb, has_pad, causal, softmax_scale * LOG2E, _dot_flags(q.dtype),
            shape_class(D, q.dtype), _bucket(S),
        )  # fmt: skip
    out = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    dropout = (dropout_p > 0.0, *_dropout_args(dropout_p, seed))
    _forward_rows(q, k, v, out, lse, pad, stride_pb, has_pad, causal, softmax_scale, dropout)
    return out, lse


def _forward_rows(q, k, v, out, lse, pad, stride_pb, has_pad, causal, softmax_scale, dropout):
    """The forward kernel: one program per block of query rows of one head."""
    has_dropout, seed_key, threshold, inv_keep = dropout
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kernel, blocks = _kernel("fwd", D, q.dtype)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)

    kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        pad,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        stride_pb,
        Hq,
        Hq // Hkv,
        T,
        S,
        softmax_scale * LOG2E,
        seed_key,
        threshold,
        inv_keep,
        _bucket(T),
        _bucket(S),
        HEAD_DIM=D,
        CAUSAL=causal,
        HAS_PAD=has_pad,
        DROPOUT=has_dropout,
        **_dot_flags(q.dtype),
        **blocks,
    )


def _backward(do, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, dropout_p, seed):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q.numel() == 0 or S == 0:  # nothing to launch; an empty side gives zero gradients on the other
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(T, _DELTA_BLOCK_M), B * Hq)](
        out, do, delta, *out.stride(), *do.stride(), Hq, T, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M
    )
    dq = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, S, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, S, D), device=v.device, dtype=v.dtype)
    pad, stride_pb = _pad_args(key_padding_mask, q)
    seed_key, threshold, inv_keep = _dropout_args(dropout_p, seed)
    flags = dict(
        HEAD_DIM=D, CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DROPOUT=dropout_p > 0.0, **_dot_flags(q.dtype)
    )
    qk_scale = softmax_scale * LOG2E

    kernel, blocks = _kernel("dkdv", D, q.dtype)
    kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        pad,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *dk.stride(),
        *dv.stride(),
        stride_pb,
        Hq,
        Hkv,
        Hq // Hkv,
        T,
        S,
        qk_scale,
        softmax_scale,
        seed_key,
        threshold,
        inv_keep,
        _bucket(T),
        _bucket(S),
        **flags,
        **blocks,
    )
    kernel, blocks = _kernel("dq", D, q.dtype)
    kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        pad,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *dq.stride(),
        stride_pb,
        Hq,
        Hq // Hkv,
        T,
        S,
        qk_scale,
        softmax_scale,
        seed_key,
        threshold,
        inv_keep,
        _bucket(T),
        _bucket(S),
        **flags,
        **blocks,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (traced whole, no graph break), autograd through the backward op.


@torch.library.custom_op("tinygraft::flash_attention", mutates_args=())
def flash_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, T, D), lse (B, Hq, T) float32, log2-based; +inf on rows with no visible key)."""
    return _forward(q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed)


@flash_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tinygraft::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, dropout_p, seed)


@flash_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, softmax_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.args = (causal, softmax_scale, dropout_p, seed)
    ctx.mark_non_differentiable(lse)


def _backward_autograd(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward_op(dout, q, k, v, out, lse, key_padding_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


flash_attention_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def flash_attention_triton(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p, seed):
    """The Triton path behind `attention.flash_attention` (inputs already checked, cast and defaulted)."""
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return flash_attention_op(
        q, k, v, key_padding_mask, bool(causal), float(scale), float(dropout_p), int(seed) if dropout_p > 0.0 else 0
    )[0]
