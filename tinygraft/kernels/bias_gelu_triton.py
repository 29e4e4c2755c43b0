"""Triton kernels and launchers for `bias_gelu` (math in bias_gelu.py; imported only when a Triton path runs).

x is viewed as (M, N) rows with the bias on the last dim. The forward tiles (BLOCK_M, BLOCK_N); the backward
gives each program one column block and a strided set of row blocks, so it writes dx tile by tile and keeps the
column sums of dh in fp32 registers, ending with one row of partial dbias per program: (GRID_M, N) partials that
the launcher sums (a few rows, not M). Arithmetic is fp32 (fp64 for fp64 inputs) whatever the storage dtype.
"""

import functools

import torch
import triton
import triton.language as tl

from tinygraft.kernels import launch
from tinygraft.kernels.backend import interpreting


@triton.jit
def _sigmoid_2u(h):
    """(s, s (1 - s)) for s = sigmoid(2u) = 0.5 (1 + tanh u), u = sqrt(2/pi) (h + 0.044715 h^3).

    Through t = exp(-2|u|) in (0, 1]: no overflow, and no cancellation in 1 - s (which costs 8x torch's fp32 error
    in the gradient when taken as a difference). No tanh in tl.math on Triton 3.6, hence the sigmoid.
    """
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    t = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + t)
    return tl.where(u >= 0, r, t * r), t * r * r


@triton.jit
def _gelu(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        s, _ = _sigmoid_2u(h)
        y = h * s
    else:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/sqrt(2)
    return y


@triton.jit
def _gelu_grad(h, APPROX_TANH: tl.constexpr):
    """d gelu / dh."""
    if APPROX_TANH:
        # with s = sigmoid(2u): y = h s, dy/dh = s + 2 h s (1 - s) du/dh, du/dh = sqrt(2/pi) (1 + 3 * 0.044715 h^2)
        s, s_1ms = _sigmoid_2u(h)
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        g = s + 2.0 * h * s_1ms * du
    else:
        # Phi(h) + h phi(h), phi the standard normal density; 0.3989... = 1/sqrt(2 pi)
        g = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    return g


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_ym,
    APPROX_TANH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]  # M * N may pass 2**31
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
    h = x.to(COMPUTE) + b.to(COMPUTE)[None, :]
    y = _gelu(h, APPROX_TANH)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr, x_ptr, b_ptr, dx_ptr, dbp_ptr, M, N, stride_dym, stride_xm, stride_dxm, GRID_M,
    APPROX_TANH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(COMPUTE)
    db = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    for start in range(pid_m * BLOCK_M, M, GRID_M * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dh = dy * _gelu_grad(x + b[None, :], APPROX_TANH)  # 0 where masked: dy loads as 0 there
        tl.store(dx_ptr + rows64 * stride_dxm + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dh, axis=0)
    tl.store(dbp_ptr + pid_m * N + cols, db, mask=col_ok)


def _configs(*pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in pairs]


# One small config under the interpreter: it runs each program in numpy, autotuning would multiply it.
_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4}
# (BLOCK_M, BLOCK_N, warps) in order of preference, per shape class: wider rows for 16-bit storage, fewer elements
# per thread for fp64 (its GELU holds twice the registers: 8 x 256 spilled 208 bytes on sm_90).
_CONFIGS = {
    "16bit": {"fwd": _configs((8, 256, 4), (16, 256, 8), (4, 1024, 8)), "bwd": _configs((16, 128, 4), (32, 128, 8),
                                                                                        (8, 256, 4))},
    "fp32": {"fwd": _configs((8, 256, 4), (4, 1024, 8)), "bwd": _configs((16, 128, 4), (8, 256, 4))},
    "fp64": {"fwd": _configs((8, 256, 4)), "bwd": _configs((8, 128, 4))},
}  # fmt: skip


def shape_class(dtype: torch.dtype) -> str:
    """The unit launch_configs.json keeps a choice by: "16bit", "fp32" or "fp64"."""
    return {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, "16bit")


def _kernel(name: str, dtype: torch.dtype):
    """(kernel, extra launch kwargs): the committed or autotuned config on a GPU, the small one when interpreted."""
    plain = {"fwd": _bias_gelu_fwd_kernel, "bwd": _bias_gelu_bwd_kernel}[name]
    if interpreting():
        return plain, _INTERPRETER
    cls = shape_class(dtype)
    return launch.autotuned(f"bias_gelu.{name}", cls, plain, _CONFIGS[cls][name], ["N"])


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _grid_m(M: int, N: int, device: torch.device) -> int:
    """Row-parallelism of the backward, fixed before autotuning picks BLOCK_M (so the partials can be allocated)."""
    if interpreting() or device.type != "cuda":
        return max(1, min(triton.cdiv(M, 16), 4))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    n_blocks = triton.cdiv(N, 128)
    return max(1, min(triton.cdiv(M, 16), triton.cdiv(4 * sms, n_blocks)))


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """y = gelu(x + bias) in x's dtype; x (..., N), bias (N,). Inputs are checked by the public function."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias = bias.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M * N == 0:
        return y.reshape(x.shape)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    kernel, fixed = _kernel("fwd", x.dtype)
    kernel[grid](
        x2, bias, y, M, N, x2.stride(0), y.stride(0),
        APPROX_TANH=approximate == "tanh", COMPUTE=_compute_dtype(x.dtype), **fixed,
    )  # fmt: skip
    return y.reshape(x.shape)


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str):
    """(dx in x's dtype, dbias in bias's dtype) for y = gelu(x + bias)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    dy2 = dy.reshape(-1, N)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    bias = bias.contiguous()
    M = x2.shape[0]
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M * N == 0:
        return dx.reshape(x.shape), torch.zeros_like(bias)
    compute = _compute_dtype(x.dtype)
    grid_m = _grid_m(M, N, x.device)
    partials = torch.empty(
        (grid_m, N), dtype=torch.float64 if compute == tl.float64 else torch.float32, device=x.device
    )

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), grid_m)

    kernel, fixed = _kernel("bwd", x.dtype)
    kernel[grid](
        dy2,
        x2,
        bias,
        dx,
        partials,
        M,
        N,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        grid_m,
        APPROX_TANH=approximate == "tanh",
        COMPUTE=compute,
        **fixed,
    )
    return dx.reshape(x.shape), partials.sum(0).to(bias.dtype)
