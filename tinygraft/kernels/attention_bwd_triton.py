"""The flash-attention backward kernels (FlashAttention-2's, attention_triton.py states the math): delta =
rowsum(dO * O); dK and dV per key block of one key/value head, walking the query tiles of every query head in its
group (grouped-query gradients summed in registers, no atomics); dQ per query block. The launchers are in
attention_triton.py."""

import triton
import triton.language as tl

from tinygraft.kernels.attention_tiles_triton import _key_range, _load_kv, _query_block, _visible
from tinygraft.kernels.rng_triton import keep_mask


@triton.jit
def _attn_bwd_delta(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    Hq,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        mask=rows,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=rows,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    keep_key,
    Q,
    DO,
    Lse,
    Delta,
    start_m,
    offs_n,
    offs_d,
    drop_base,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    T,
    S,
    off_causal,
    qk_scale,
    seed_key,
    drop_threshold,
    inv_keep,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Transposed tiles (keys x queries) so dK and dV accumulate without transposing P.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m < T
    # Rows past T load q = dO = 0, LSE = +inf, delta = 0: their p and dS are 0 without a mask.
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=rows[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=rows[:, None], other=0.0)
    lse = tl.load(Lse + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=rows, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        if CAUSAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + off_causal, p_t, 0.0)
    if HAS_PAD:
        p_t = tl.where(keep_key[:, None], p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        offs = drop_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None]
        keep = keep_mask(seed_key, offs, drop_threshold)
        pd_t = tl.where(keep, p_t * inv_keep, 0.0)
        dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
    else:
        pd_t = p_t
    dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
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
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_dvd,
    stride_pb,
    Hq,
    Hkv,
    GROUPS,
    T,
    S,
    qk_scale,
    sm_scale,
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
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < S
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=cols, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=cols, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    keep_key = offs_n < S
    if HAS_PAD:
        keep_key = tl.load(Pad + b.to(tl.int64) * stride_pb + offs_n, mask=offs_n < S, other=0) != 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query rows [lo, full) see part of this key block (causal diagonal), rows [full, T) all of it, rows < lo none.
    off_causal = S - T
    if CAUSAL:
        lo = tl.maximum(start_n - off_causal, 0) // BLOCK_M * BLOCK_M
        full = (tl.maximum(start_n + BLOCK_N - 1 - off_causal, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.minimum(full, (T + BLOCK_M - 1) // BLOCK_M * BLOCK_M), lo)
    else:
        lo = 0
        full = 0
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        bh = b * Hq + h
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        Lh = Lse + bh.to(tl.int64) * T
        Dh = Delta + bh.to(tl.int64) * T
        drop_base = bh.to(tl.int64) * T * S
        for start_m in range(lo, full, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                keep_key,
                Qh,
                DOh,
                Lh,
                Dh,
                start_m,
                offs_n,
                offs_d,
                drop_base,
                stride_qt,
                stride_qd,
                stride_dot,
                stride_dod,
                T,
                S,
                off_causal,
                qk_scale,
                seed_key,
                drop_threshold,
                inv_keep,
                CAUSAL,
                HAS_PAD,
                DROPOUT,
                True,
                UPCAST,
                DOT_PRECISION,
                BLOCK_M,
            )
        for start_m in range(full, T, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                keep_key,
                Qh,
                DOh,
                Lh,
                Dh,
                start_m,
                offs_n,
                offs_d,
                drop_base,
                stride_qt,
                stride_qd,
                stride_dot,
                stride_dod,
                T,
                S,
                off_causal,
                qk_scale,
                seed_key,
                drop_threshold,
                inv_keep,
                CAUSAL,
                HAS_PAD,
                DROPOUT,
                False,
                UPCAST,
                DOT_PRECISION,
                BLOCK_M,
            )

    DK += b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    tl.store(
        DK + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=cols,
    )
    tl.store(DV + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=cols)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
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
    inv_keep,
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
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        visible = _visible(offs_m, offs_n, S, off_causal, CAUSAL)
        p = tl.where(visible, p, 0.0)
    if HAS_PAD:
        keep_key = tl.load(Pad + offs_n, mask=offs_n < S, other=0) != 0
        p = tl.where(keep_key[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        offs = drop_base + offs_m[:, None].to(tl.int64) * S + offs_n[None, :]
        dp = tl.where(keep_mask(seed_key, offs, drop_threshold), dp * inv_keep, 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
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
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    stride_pb,
    Hq,
    GROUPS,
    T,
    S,
    qk_scale,
    sm_scale,
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
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    Pad += b.to(tl.int64) * stride_pb
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=rows[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=rows[:, None], other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * T + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    drop_base = pid_bh.to(tl.int64) * T * S
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    off_causal = S - T
    full, hi = _key_range(start_m, S, off_causal, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
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
            inv_keep,
            CAUSAL,
            HAS_PAD,
            DROPOUT,
            False,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
        )
    for start_n in range(full, hi, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
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
            inv_keep,
            CAUSAL,
            HAS_PAD,
            DROPOUT,
            True,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
        )
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(
        DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=rows[:, None],
    )
