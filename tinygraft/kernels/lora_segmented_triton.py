"""Triton kernels and launchers for `lora_segmented.segmented_lora_linear` (the math is in lora_segmented.py).

Every kernel reads rows of x (or dY) through `order`, the permutation that groups the rows by adapter, and works on
one adapter at a time, as punica's SGMV (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving") and S-LoRA (Sheng
et al. 2023) do. The row kernels take the tile table `lora_segmented.plan_rows` builds: tile t covers the sorted
positions [start, end) of ONE adapter (adapter -1: the rows that take the base layer alone), at most BLOCK_M of
them, so a program loads one adapter's A or B for its whole tile. BLOCK_M is the table's and is not autotuned
(the table exists before a config is picked); the other block sizes are.

- `_seg_skinny_kernel`: out[rows] = alpha_g * drop_g(P[rows]) @ Q_g, Q_g one adapter's (K x r) slice:
  s = drop(x) @ A_g^T / (1 - p_g) and g = dY @ B_g. The r-wide products, one mask draw per element of x.
- `_seg_gemm_kernel`: out[rows] = P[rows] @ Q + bias + scale_g * drop_g(U[rows] @ V_g), the (tokens x features)
  GEMMs: y (P=x, Q=W^T, U=s, V=B_g^T) and dX (P=dY, Q=W, U=g, V=A_g, the mask on the low-rank term). As in
  lora_triton's `_lowrank_matmul_kernel`, the r-wide step seeds the one fp32 accumulator before the main K loop.
- `_seg_reduce_kernel`: out_g = alpha_g * drop_g(P[rows of g])^T @ Q[rows of g] for every adapter g at once:
  dA_g^T (P=x, Q=g) and dB_g (P=dY, Q=s). Grid: adapters x feature blocks x slices of the adapter's rows (split-K,
  fp32 partials summed by the launcher): no atomics, so the gradients are deterministic.

Rows are gathered through `order` inside the kernels rather than by permuting x once: a permuted copy costs a read
and a write of x before the forward and a scatter of y after it (and the same for dY and dX in the backward), four
extra passes over (tokens x features) tensors, where the gather costs one int32 per row; each row's features stay
contiguous, so the loads are as coalesced as a plain GEMM's. Each output row belongs to exactly one tile, so the
scattered stores never collide.
"""

import torch
import triton
import triton.language as tl

from tinygraft.kernels import backend, launch
from tinygraft.kernels.lora_triton import _block_r, _cast_out, _precision, shape_class
from tinygraft.kernels.rng_triton import keep_mask


@triton.jit
def _rows(order_ptr, start, end, BLOCK_M: tl.constexpr):
    """A tile's original rows (int64: row * stride may pass 2**31) and which are live; past the end the last row
    again, so loads need no row mask (the stores mask with `live`)."""
    pos = start + tl.arange(0, BLOCK_M)
    rows = tl.load(order_ptr + tl.minimum(pos, end - 1)).to(tl.int64)
    return rows, pos < end


@triton.jit
def _seg_skinny_kernel(
    p_ptr, q_ptr, out_ptr, order_ptr, table_ptr, alpha_ptr, threshold_ptr,
    K, R,
    stride_pm, stride_pk, stride_qg, stride_qk, stride_qr, stride_om, stride_or,
    key,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    start = tl.load(table_ptr + pid_t * 3)
    end = tl.load(table_ptr + pid_t * 3 + 1)
    adapter = tl.load(table_ptr + pid_t * 3 + 2)  # -1: the rows that take the base layer alone
    if start >= end:  # a spare tile: the table is sized before the rows per adapter are known
        return
    rows, live = _rows(order_ptr, start, end, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    out_mask = live[:, None] & (offs_r[None, :] < R)
    if adapter < 0:  # base-only rows: their s (or g) is zero, and their x need not be read
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_R), dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    q_base = q_ptr + adapter.to(tl.int64) * stride_qg
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, mask=offs_k[None, :] < K,
                    other=0.0)  # fmt: skip
        if DROPOUT:
            # P is x here: the element index is its row * in + col in x flattened to (tokens, in), K = in.
            index = rows[:, None] * K + offs_k[None, :]
            p = tl.where(keep_mask(key, index, tl.load(threshold_ptr + adapter)), p, 0.0)
        q = tl.load(q_base + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                    mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)  # fmt: skip
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
    acc = acc * tl.load(alpha_ptr + adapter)
    tl.store(out_ptrs, _cast_out(acc, out_ptr, ROUND_BF16), mask=out_mask)


@triton.jit
def _seg_gemm_kernel(
    p_ptr, q_ptr, u_ptr, v_ptr, bias_ptr, out_ptr, order_ptr, table_ptr, alpha_ptr, threshold_ptr,
    N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn,
    stride_um, stride_ur, stride_vg, stride_vr, stride_vn,
    stride_om, stride_on,
    key,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(table_ptr + pid_t * 3)
    end = tl.load(table_ptr + pid_t * 3 + 1)
    adapter = tl.load(table_ptr + pid_t * 3 + 2)
    if start >= end:
        return
    rows, live = _rows(order_ptr, start, end, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % N  # columns past the edge wrap to valid memory; the store masks them
    has_adapter = adapter >= 0
    g = tl.maximum(adapter, 0).to(tl.int64)
    r_live = tl.where(has_adapter, R, 0)  # a base-only tile reads nothing of adapter 0: rank 0 masks V's loads

    # The low-rank step first, seeding the accumulator (why: lora_triton's `_lowrank_matmul_kernel`). U's rows are
    # zero on base-only tiles, and V's loads are masked off there, so such a tile adds nothing. Masking, not a
    # branch around the loop: the r-wide dot costs about r / K of the tile's work, and a branch would keep the
    # compiler from pipelining the main loop's loads.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=offs_r[None, :] < R,
                    other=0.0)  # fmt: skip
        v = tl.load(v_ptr + g * stride_vg + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn,
                    mask=offs_r[:, None] < r_live, other=0.0)  # fmt: skip
        if UPCAST:
            u = u.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(u, v, acc, input_precision=PRECISION)
    acc = acc * tl.where(has_adapter, tl.load(alpha_ptr + g), 0.0)
    if DROPOUT:
        # This tile is (tokens x in) here (dX): the element index is x's own row * in + col, N = in.
        index = rows[:, None] * N + offs_n[None, :]
        acc = tl.where(keep_mask(key, index, tl.load(threshold_ptr + g)), acc, 0.0)

    offs_k = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + cols[None, :] * stride_qn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        p = tl.load(p_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        q = tl.load(q_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, _cast_out(acc, out_ptr, ROUND_BF16), mask=live[:, None] & (offs_n[None, :] < N))


@triton.jit
def _seg_reduce_kernel(
    p_ptr, q_ptr, out_ptr, order_ptr, seg_ptr, alpha_ptr, threshold_ptr,
    K, R, SPLIT,
    stride_pm, stride_pk, stride_qm, stride_qr,
    stride_os, stride_og, stride_ok, stride_or,
    key,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)  # the adapter
    r_blocks = tl.cdiv(R, BLOCK_R)
    pid_k = tl.program_id(1) // r_blocks
    pid_r = tl.program_id(1) % r_blocks
    pid_s = tl.program_id(2)  # which slice of the adapter's rows this program sums
    # Adapter g's rows are the sorted positions [seg[g + 1], seg[g + 2]) (group 0 holds the base-only rows).
    lo = tl.load(seg_ptr + g + 1)
    hi = tl.load(seg_ptr + g + 2)
    chunk = tl.cdiv(tl.cdiv(hi - lo, SPLIT), BLOCK_M) * BLOCK_M
    first = lo + pid_s * chunk
    last = tl.minimum(first + chunk, hi)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = offs_k % K
    # An adapter with no rows (or a slice past its rows) still stores its zeros: every output is written.
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(first, last, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        live = pos < last
        rows = tl.load(order_ptr + pos, mask=live, other=0).to(tl.int64)
        # P^T's tile (features x rows), read straight from P's rows.
        pt = tl.load(p_ptr + rows[None, :] * stride_pm + cols[:, None] * stride_pk, mask=live[None, :], other=0.0)
        if DROPOUT:
            index = rows[None, :] * K + offs_k[:, None]  # P is x (dA): index = row * in + col, K = in
            pt = tl.where(keep_mask(key, index, tl.load(threshold_ptr + g)), pt, 0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + offs_r[None, :] * stride_qr,
                    mask=live[:, None] & (offs_r[None, :] < R), other=0.0)  # fmt: skip
        if UPCAST:
            pt = pt.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(pt, q, acc, input_precision=PRECISION)
    acc = acc * tl.load(alpha_ptr + g)
    out_ptrs = out_ptr + pid_s * stride_os + g * stride_og + offs_k[:, None] * stride_ok + offs_r[None, :] * stride_or
    tl.store(out_ptrs, _cast_out(acc, out_ptr, ROUND_BF16), mask=(offs_k[:, None] < K) & (offs_r[None, :] < R))


# ---------------------------------------------------------------------------------------------------------------
# Launchers. On CUDA: the committed config or autotuning (launch.py); under the interpreter one fixed small config.


def _configs(names, shapes):
    return [triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s) for *blocks, w, s in shapes]


# Candidates in order of preference. The row kernels' BLOCK_M is the tile table's (64: an adapter's rows in a mixed
# batch are often few, and a 64-row tile is one Hopper warpgroup's wgmma height); fp32 keeps small tiles, as in
# lora_triton (IEEE products are FMA loops and hold twice the bytes).
_GEMM_CONFIGS = {
    "16bit": _configs(("BLOCK_N", "BLOCK_K"), [(128, 64, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4)]),
    "fp32": _configs(("BLOCK_N", "BLOCK_K"), [(64, 32, 4, 3), (32, 32, 4, 2)]),
}
_SKINNY_CONFIGS = {
    "16bit": _configs(("BLOCK_K",), [(128, 4, 3), (64, 4, 4), (256, 8, 3)]),
    "fp32": _configs(("BLOCK_K",), [(64, 4, 3), (32, 4, 2)]),
}
_REDUCE_CONFIGS = {
    "16bit": _configs(("BLOCK_K", "BLOCK_M"), [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)]),
    "fp32": _configs(("BLOCK_K", "BLOCK_M"), [(64, 32, 4, 2), (32, 64, 4, 2)]),
}
_KERNELS = {
    "gemm": (_seg_gemm_kernel, _GEMM_CONFIGS, ["N", "K", "R", "HAS_BIAS", "DROPOUT"]),
    "skinny": (_seg_skinny_kernel, _SKINNY_CONFIGS, ["K", "R", "DROPOUT"]),
    "reduce": (_seg_reduce_kernel, _REDUCE_CONFIGS, ["K", "R", "SPLIT", "DROPOUT"]),
}
# Small blocks under the interpreter, so the tests' awkward sizes cross block edges and the K loops turn.
_INTERPRETER = {"gemm": {"BLOCK_N": 32, "BLOCK_K": 32}, "skinny": {"BLOCK_K": 32},
                "reduce": {"BLOCK_K": 32, "BLOCK_M": 16}}  # fmt: skip


def _launch(name: str, dtype: torch.dtype, grid, args, flags):
    """Run kernel `name` with the interpreter's fixed blocks, or the committed config / autotuner on a GPU;
    `grid` maps the block sizes to the launch grid."""
    fn, configs, keys = _KERNELS[name]
    if backend.interpreting():
        cfg = _INTERPRETER[name]
        fn[grid(cfg)](*args, **flags, **cfg)
        return
    cls = shape_class(dtype)
    kernel, fixed = launch.autotuned(f"lora_segmented.{name}", cls, fn, configs[cls], keys)
    kernel[grid](*args, **flags, **fixed)


def _flags(in_dtype, out_dtype, dropout_key):
    return dict(
        DROPOUT=dropout_key is not None,
        UPCAST=backend.upcast_bf16_dots(in_dtype),
        ROUND_BF16=backend.upcast_bf16_dots(out_dtype),
        PRECISION=_precision(in_dtype),
    )


def seg_skinny(p, q, alpha, order, table, block_m, threshold=None, key=None):
    """out (M, r) = alpha[g] * drop_g(p (M, K)) @ q[g] (K, r) for each row's adapter g (zero on base-only rows).

    q is (G, K, r), any strides. Dropout (a `key` and per-adapter `threshold`s) masks p's element (m, k) at index
    m * K + k, so p must be x itself.
    """
    M, K = p.shape
    R = q.shape[2]
    out = torch.empty((M, R), device=p.device, dtype=p.dtype)
    if M == 0:
        return out
    block_r = _block_r(R)
    args = (
        p, q, out, order, table, alpha, threshold if threshold is not None else alpha,
        K, R,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        key or 0,
    )  # fmt: skip
    flags = dict(_flags(p.dtype, out.dtype, key), BLOCK_M=block_m, BLOCK_R=block_r)
    _launch("skinny", p.dtype, lambda meta: (table.shape[0], triton.cdiv(R, block_r)), args, flags)
    return out


def seg_gemm(p, q, u, v, alpha, order, table, block_m, bias=None, threshold=None, key=None):
    """out (M, N) = p (M, K) @ q (K, N) + bias + alpha[g] * drop_g(u (M, r) @ v[g] (r, N)), g each row's adapter.

    v is (G, r, N), any strides. Dropout masks the low-rank term's element (m, n) at index m * N + n (dX).
    """
    M, K = p.shape
    N = q.shape[1]
    R = u.shape[1]
    out = torch.empty((M, N), device=p.device, dtype=p.dtype)
    if M == 0 or N == 0:
        return out
    args = (
        p, q, u, v, bias if bias is not None else out, out, order, table, alpha,
        threshold if threshold is not None else alpha,
        N, K, R,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        key or 0,
    )  # fmt: skip
    flags = dict(_flags(p.dtype, out.dtype, key), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_R=_block_r(R))
    _launch("gemm", p.dtype, lambda meta: (table.shape[0], triton.cdiv(N, meta["BLOCK_N"])), args, flags)
    return out


def _split_count(M: int, G: int, K: int, device: torch.device) -> int:
    """Slices of each adapter's rows the reduction uses: enough programs to fill the GPU, slices >= 256 rows on
    average. Sized from M / G, not the real counts, so the launch needs no host sync."""
    if backend.interpreting() or device.type != "cuda":
        target = 4 * G  # small, so the tests exercise the split path too
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    rows_per_adapter = triton.cdiv(M, G)
    return max(1, min(triton.cdiv(rows_per_adapter, 256), triton.cdiv(target, G * triton.cdiv(K, 64))))


def seg_reduce(p, q, alpha, order, seg, out, threshold=None, key=None):
    """out[g] (K, r) = alpha[g] * drop_g(p[rows of g])^T @ q[rows of g] for every adapter g; out may be a strided
    view (e.g. dA's transpose). Dropout masks p's element (m, k) at index m * K + k, so p must be x itself."""
    M, K = p.shape
    R = q.shape[1]
    G = out.shape[0]
    if M == 0 or K == 0:
        return out.zero_()
    split = _split_count(M, G, K, p.device)
    # Split-K partials go to an fp32 buffer summed below; one slice writes `out` directly.
    target = out if split == 1 else torch.empty((split, G, K, R), device=p.device, dtype=torch.float32)
    stride_os = 0 if split == 1 else target.stride(0)
    block_r = _block_r(R)
    args = (
        p, q, target, order, seg, alpha, threshold if threshold is not None else alpha,
        K, R, split,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        stride_os, target.stride(-3), target.stride(-2), target.stride(-1),
        key or 0,
    )  # fmt: skip
    flags = dict(_flags(p.dtype, target.dtype, key), BLOCK_R=block_r)
    grid = lambda meta: (G, triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(R, block_r), split)  # noqa: E731
    _launch("reduce", p.dtype, grid, args, flags)
    if split > 1:
        out.copy_(target.sum(0))
    return out
