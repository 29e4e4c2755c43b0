"""Triton kernels and launchers for `lora.lora_linear` (the math is in lora.py's docstring).

Two kernels serve the six products of a LoRA layer's forward and backward:

- `_lowrank_matmul_kernel`: out = P @ Q + bias + scale * drop(U @ V), the (tokens x features) GEMMs. The r-wide
  step U @ V (U is M x r, V is r x N) runs in the same output tile as the main K loop, so the low-rank term never
  exists as a second (tokens x features) tensor in memory. It runs *before* the main loop: its scaled, masked
  product seeds the one fp32 accumulator, where running it after would need a second BLOCK_M x BLOCK_N
  accumulator (on a 128x256 tile that doubles the registers and spills). Forward y (P=x, Q=W^T, U=s, V=B^T),
  backward dX (P=dY, Q=W, U=g, V=A, with the dropout mask on the low-rank term), and dW (no low-rank step).
- `_skinny_matmul_kernel`: out = alpha * drop(P) @ Q with Q only r columns wide (one padded BLOCK_R tile up to
  r = 128, more tiles beyond), and
  the K range optionally split across programs (partial sums in fp32, added by the launcher) for the reductions
  over tokens, which would otherwise leave most of the GPU idle. s = drop(x) @ A^T, g = dY @ B,
  dA^T = drop(x)^T @ g, dB = dY^T @ s.

Dropout masks come from `rng_triton.keep_mask` at element index row * in_features + col of the flattened
(tokens x in) input, whichever operand holds it; the launchers pass that index's strides.
"""

import torch
import triton
import triton.language as tl

from tinygraft.kernels import backend, launch, rng
from tinygraft.kernels.rng_triton import keep_mask


@triton.jit
def _cast_out(acc, out_ptr, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        # Triton 3.9's interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even), doubling the
        # rounding error; adding the round-to-nearest-even bias to the bits first makes the truncation exact
        # (zeros kept as they are: biased, they would read as subnormals).
        bits = acc.to(tl.uint32, bitcast=True)
        acc = tl.where(acc == 0.0, acc, (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True))
    return acc.to(out_ptr.dtype.element_ty)


@triton.jit
def _lowrank_matmul_kernel(
    p_ptr, q_ptr, u_ptr, v_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,
    scale, key, threshold,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order (Triton tutorial 03): GROUP_M row-tiles share each column of Q while it sits in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge wrap around to valid memory (no load masks on M, N); the store masks them.
    rows = offs_m % M
    cols = offs_n % N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LOWRANK:
        # r runs in BLOCK_R chunks (a power of two >= 16, tl.dot's minimum; one chunk up to r = 128), the padding
        # loaded as zeros.
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(
                u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=offs_r[None, :] < R, other=0.0
            )
            v = tl.load(
                v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn, mask=offs_r[:, None] < R, other=0.0
            )
            if UPCAST:
                u = u.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(u, v, acc, input_precision=PRECISION)
        acc = acc * scale
        if DROPOUT:
            # This tile is (tokens x in) here, so the element index is the input's own row * N + col.
            index = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            acc = tl.where(keep_mask(key, index, threshold), acc, 0.0)

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
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, _cast_out(acc, out_ptr, ROUND_BF16), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _skinny_matmul_kernel(
    p_ptr, q_ptr, out_ptr,
    M, K, R, K_PER_SPLIT,
    stride_pm, stride_pk, stride_qk, stride_qr,
    stride_os, stride_om, stride_or,
    mask_sm, mask_sk,
    alpha, key, threshold,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)  # which slice of K this program sums (split-K)
    pid_r = tl.program_id(2)  # which BLOCK_R columns (one block up to r = 128)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = offs_m % M
    k_start = pid_s * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, mask=in_k[None, :], other=0.0)
        if DROPOUT:
            # P holds the input x (or its transpose): index = its (token, feature) position, via the mask strides.
            index = rows[:, None].to(tl.int64) * mask_sm + offs_k[None, :].to(tl.int64) * mask_sk
            p = tl.where(keep_mask(key, index, threshold), p, 0.0)
        q = tl.load(
            q_ptr + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr,
            mask=in_k[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)

    acc = acc * alpha
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, _cast_out(acc, out_ptr, ROUND_BF16), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


# ---------------------------------------------------------------------------------------------------------------
# Launchers. On CUDA the block shapes are autotuned (Hopper: 128-row tiles for wgmma, 3-4 pipeline stages within
# 228 KB of shared memory); under the interpreter one fixed small config runs, since tuning there measures nothing.


def _gemm_configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]  # fmt: skip


def _skinny_configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) in order of preference, per shape class: fp32 products (IEEE, or TF32
# where allowed) hold twice the bytes per tile, and IEEE ones are FMA loops, not tensor-core MMAs, so fp32 keeps
# small tiles (128 x 128 at IEEE spilled 13 KB per thread in the compile check).
_GEMM_CONFIGS = {
    "16bit": _gemm_configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                            (64, 64, 64, 4, 4)]),
    "fp32": _gemm_configs([(64, 64, 32, 4, 3), (64, 32, 32, 4, 2)]),
}  # fmt: skip
_SKINNY_CONFIGS = {
    "16bit": _skinny_configs([(64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3)]),
    "fp32": _skinny_configs([(64, 64, 4, 3), (32, 64, 4, 2)]),
}
_INTERPRETER_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
_INTERPRETER_SKINNY = {"BLOCK_M": 64, "BLOCK_K": 128}


def shape_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _tuned(kernel_name: str, dtype: torch.dtype):
    """(kernel, extra launch kwargs) on a GPU: the committed config for this target, or an autotuner. Keys name the
    flags too, so the forward, dX and dW GEMMs each get their own tuned config."""
    if kernel_name == "gemm":
        keys = ["M", "N", "K", "R", "HAS_LOWRANK", "DROPOUT"]
        cls = shape_class(dtype)
        return launch.autotuned("lora.gemm", cls, _lowrank_matmul_kernel, _GEMM_CONFIGS[cls], keys)
    keys = ["M", "K", "R", "K_PER_SPLIT", "DROPOUT"]
    cls = shape_class(dtype)
    return launch.autotuned("lora.skinny", cls, _skinny_matmul_kernel, _SKINNY_CONFIGS[cls], keys)


def _block_r(r: int) -> int:
    return min(128, max(16, triton.next_power_of_2(r)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get fp32 products, as torch's matmul does unless the user allowed TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dropout_args(dropout_p: float, seed: int) -> tuple[bool, int, int]:
    if dropout_p == 0.0:
        return False, 0, 0
    return True, rng.seed_key(seed), rng.drop_threshold(dropout_p)


def lowrank_matmul(p, q, u=None, v=None, bias=None, scale=1.0, dropout_p=0.0, seed=0, out_dtype=None):
    """out (M, N) = p (M, K) @ q (K, N) + bias + scale * drop(u (M, r) @ v (r, N)); any strides."""
    M, K = p.shape
    N = q.shape[1]
    out = torch.empty((M, N), device=p.device, dtype=out_dtype or p.dtype)
    if M == 0 or N == 0:
        return out
    has_lowrank = u is not None
    R = u.shape[1] if has_lowrank else 0
    u_, v_ = (u, v) if has_lowrank else (p, q)  # placeholders the kernel never reads
    dropout, key, threshold = _dropout_args(dropout_p, seed)
    args = (
        p, q, u_, v_, bias if bias is not None else out, out,
        M, N, K, R,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        u_.stride(0), u_.stride(1), v_.stride(0), v_.stride(1),
        out.stride(0), out.stride(1),
        float(scale), key, threshold,
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, DROPOUT=dropout,
        UPCAST=backend.upcast_bf16_dots(p.dtype), ROUND_BF16=backend.upcast_bf16_dots(out.dtype),
        PRECISION=_precision(p.dtype), BLOCK_R=_block_r(max(R, 1)),
    )  # fmt: skip
    if backend.interpreting():
        cfg = _INTERPRETER_GEMM
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _lowrank_matmul_kernel[grid](*args, **flags, **cfg)
    else:
        kernel, fixed = _tuned("gemm", p.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, **flags, **fixed)
    return out


def _split_count(M: int, K: int, device: torch.device) -> int:
    """How many slices of K the skinny reduction uses: enough programs to fill the GPU, slices >= 256 long."""
    if backend.interpreting() or device.type != "cuda":
        target = 4  # small, so the tests exercise the split path too (and the compile check, on meta tensors)
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    m_blocks = triton.cdiv(M, 64)
    return max(1, min(triton.cdiv(K, 256), triton.cdiv(target, m_blocks)))


def skinny_matmul(p, q, alpha=1.0, dropout_p=0.0, seed=0, mask_strides=(0, 0), out=None, split=None):
    """out (M, r) = alpha * drop(p (M, K)) @ q (K, r), r small; `out` may be a strided view (e.g. a transpose).

    The dropout mask of p's element (m, k) is keep_mask at index m * mask_strides[0] + k * mask_strides[1].
    """
    M, K = p.shape
    R = q.shape[1]
    if out is None:
        out = torch.empty((M, R), device=p.device, dtype=p.dtype)
    if M == 0 or R == 0 or K == 0:
        return out.zero_()
    split = split or _split_count(M, K, p.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split), 256) * 256
    split = triton.cdiv(K, k_per_split)
    # Split-K partials go to an fp32 buffer summed below; one slice writes `out` directly.
    target = out if split == 1 else torch.empty((split, M, R), device=p.device, dtype=torch.float32)
    stride_os = 0 if split == 1 else target.stride(0)
    dropout, key, threshold = _dropout_args(dropout_p, seed)
    args = (
        p, q, target,
        M, K, R, k_per_split,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        stride_os, target.stride(-2), target.stride(-1),
        mask_strides[0], mask_strides[1],
        float(alpha), key, threshold,
    )  # fmt: skip
    block_r = _block_r(R)
    r_blocks = triton.cdiv(R, block_r)
    flags = dict(
        DROPOUT=dropout,
        UPCAST=backend.upcast_bf16_dots(p.dtype),
        ROUND_BF16=backend.upcast_bf16_dots(target.dtype),
        PRECISION=_precision(p.dtype),
        BLOCK_R=block_r,
    )
    if backend.interpreting():
        cfg = _INTERPRETER_SKINNY
        _skinny_matmul_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), split, r_blocks)](*args, **flags, **cfg)
    else:
        kernel, fixed = _tuned("skinny", p.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), split, r_blocks)  # noqa: E731
        kernel[grid](*args, **flags, **fixed)
    if split > 1:
        out.copy_(target.sum(0))
    return out
