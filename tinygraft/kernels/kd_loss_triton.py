"""Triton kernel and launcher for one chunk of `kd_loss.kd_loss` (the math is in kd_loss.py's docstring).

`_kd_rows_kernel` takes one chunk's student and teacher logits s, t (rows, V), as the LM heads' matmuls left them
(before the temperature), and gives each row one program that walks the vocabulary in BLOCK_V tiles:

    pass 1  online logsumexp of u = s / T and of t / T (running max and rescaled running sum, Milakov & Gimelshein
            2018), so log q = u - lse_q and log p = t / T - lse_p are known tile by tile afterwards
    pass 2  D for the row (forward KL also writes its gradient q - p here: it needs no D)
    pass 3  reverse KL and JSD only: their gradients subtract D (or KL(q || m)) from every element, so they wait for
            the whole row's sum

The gradient d loss / d s = T^2 / |R| * dD/du / T is written over s in place, so the chunk's (rows, V) logits block
becomes the gradient block the launcher multiplies by W_s and h_s, and no third (rows, V) tensor exists; the design
is Liger-Kernel's fused linear JSD (Hsu et al. 2024). The row's D goes to a (rows,) fp32 vector the caller sums.
Rows not kept (ignore_index) get D = 0 and a zero gradient row. Arithmetic is fp32 whatever the storage dtype.
Each pass re-reads the row rather than keeping it on chip: a GPT-2 row is 50,257 logits, far past the registers.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from tinygraft.kernels import backend, launch
from tinygraft.kernels.lora_triton import _cast_out

KERNEL = "kd_loss.rows"
DIVERGENCES = ("forward", "reverse", "jsd")


@triton.jit
def _log_probs(s_row, t_row, cols, live, inv_temp, lse_q, lse_p):
    """One tile's log q and log p at temperature T (passes 2 and 3); dead columns read finite zeros, which the
    callers mask out, so no 0 * inf arises."""
    log_q = tl.load(s_row + cols, mask=live, other=0.0).to(tl.float32) * inv_temp - lse_q
    log_p = tl.load(t_row + cols, mask=live, other=0.0).to(tl.float32) * inv_temp - lse_p
    return log_q, log_p


@triton.jit
def _log_mix(log_p, log_q, log_beta, log_1m_beta):
    """log m = log(beta p + (1 - beta) q) from the log-probabilities, as a logaddexp: no log(0) where p or q
    underflows. Its log1p is Kahan's log(u) * x / (u - 1), u = 1 + x (Goldberg 1991, theorem 4): no log1p in
    tl.math on Triton 3.6, and a plain log(1 + x) loses x's low bits: with beta 0.1, m is close to q and
    log q - log m a small difference, and the tests' dW_s went past twice torch's error."""
    a = log_p + log_beta
    b = log_q + log_1m_beta
    hi = tl.maximum(a, b)
    x = tl.exp(tl.minimum(a, b) - hi)
    u = 1.0 + x
    return hi + tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _kd_rows_kernel(
    s_ptr, t_ptr, keep_ptr, scale_ptr, d_ptr,
    V, stride_sm, stride_tm,
    inv_temp, beta, log_beta, log_1m_beta,
    DIVERGENCE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 at 43k rows of a GPT-2 vocabulary
    s_row = s_ptr + row * stride_sm
    t_row = t_ptr + row * stride_tm
    offs = tl.arange(0, BLOCK_V)
    if tl.load(keep_ptr + row) == 0:
        zeros = tl.zeros((BLOCK_V,), dtype=s_ptr.dtype.element_ty)
        for v0 in range(0, V, BLOCK_V):
            tl.store(s_row + v0 + offs, zeros, mask=v0 + offs < V)
        tl.store(d_ptr + row, 0.0)
        return

    # Pass 1. Every tile holds at least one live column, so the running maxima are finite after the first and
    # exp(-inf - max) = 0 starts the sums without a special case.
    m_q = float("-inf")
    m_p = float("-inf")
    l_q = 0.0
    l_p = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        live = cols < V
        u = tl.load(s_row + cols, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
        w = tl.load(t_row + cols, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
        new_q = tl.maximum(m_q, tl.max(u, axis=0))
        new_p = tl.maximum(m_p, tl.max(w, axis=0))
        l_q = l_q * tl.exp(m_q - new_q) + tl.sum(tl.exp(u - new_q), axis=0)
        l_p = l_p * tl.exp(m_p - new_p) + tl.sum(tl.exp(w - new_p), axis=0)
        m_q = new_q
        m_p = new_p
    lse_q = m_q + tl.log(l_q)
    lse_p = m_p + tl.log(l_p)
    g_scale = tl.load(scale_ptr).to(tl.float32) * inv_temp  # T^2 / |R| from the device: no host sync for |R|

    # Pass 2. Per-lane partial sums, added across lanes once at the end (a tree over BLOCK_V lanes, not one long
    # running sum). Dead columns load finite zeros and are masked out of the sums, never producing 0 * inf.
    acc_d = tl.zeros((BLOCK_V,), dtype=tl.float32)
    acc_kq = tl.zeros((BLOCK_V,), dtype=tl.float32)  # JSD: KL(q || m), which its gradient needs
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        live = cols < V
        log_q, log_p = _log_probs(s_row, t_row, cols, live, inv_temp, lse_q, lse_p)
        if DIVERGENCE == "forward":
            p = tl.exp(log_p)
            acc_d += tl.where(live, p * (log_p - log_q), 0.0)
            tl.store(s_row + cols, _cast_out(g_scale * (tl.exp(log_q) - p), s_ptr, ROUND_BF16), mask=live)
        elif DIVERGENCE == "reverse":
            acc_d += tl.where(live, tl.exp(log_q) * (log_q - log_p), 0.0)
        else:
            log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
            kq = tl.where(live, tl.exp(log_q) * (log_q - log_m), 0.0)
            kp = tl.where(live, tl.exp(log_p) * (log_p - log_m), 0.0)
            acc_kq += kq
            acc_d += beta * kp + (1.0 - beta) * kq
    d = tl.sum(acc_d, axis=0)
    tl.store(d_ptr + row, d)

    # Pass 3: dD/du = q ((log q - log p) - D) for reverse KL, (1 - beta) q ((log q - log m) - KL(q || m)) for JSD.
    if DIVERGENCE != "forward":
        kl_q = tl.sum(acc_kq, axis=0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            live = cols < V
            log_q, log_p = _log_probs(s_row, t_row, cols, live, inv_temp, lse_q, lse_p)
            if DIVERGENCE == "reverse":
                grad = tl.exp(log_q) * ((log_q - log_p) - d)
            else:
                log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
                grad = (1.0 - beta) * tl.exp(log_q) * ((log_q - log_m) - kl_q)
            tl.store(s_row + cols, _cast_out(g_scale * grad, s_ptr, ROUND_BF16), mask=live)


# ---------------------------------------------------------------------------------------------------------------
# Launcher. On CUDA: the committed config or autotuning (launch.py); under the interpreter one fixed small block.


def _configs(pairs):
    return [triton.Config({"BLOCK_V": v}, num_warps=w) for v, w in pairs]


# (BLOCK_V, warps) in order of preference: 8 elements per thread per tensor (a 16-byte load of bf16). A memory-bound
# row walk wants occupancy, and at 16 per thread JSD's passes took 146-154 registers on sm_80/sm_90 (or spilled),
# against 62-79 at 8; 16-bit rows take the wider tile first, fewer turns of the loop for the same bytes.
_CONFIGS = {
    "16bit": _configs([(4096, 16), (2048, 8), (1024, 4)]),
    "fp32": _configs([(2048, 8), (4096, 16), (1024, 4)]),
}
# Small under the interpreter, so the tests' vocabularies end mid-tile and the loops turn (tests may change it).
_INTERPRETER = {"BLOCK_V": 32}


def shape_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _launchable(cls: str):
    """(kernel, extra launch kwargs): the committed config for this target, or an autotuner over the survivors."""
    configs = _CONFIGS[cls]
    pick = launch.chosen(KERNEL, cls, configs)
    if pick is not None:
        return _kd_rows_kernel, {**pick.kwargs, "num_warps": pick.num_warps, "num_stages": pick.num_stages}
    names = tuple(launch.config_key(c) for c in launch.candidates(KERNEL, cls, configs))
    return _tuner(launch.current_target(), cls, names), {}


@functools.cache
def _tuner(target, cls, names):
    # Not launch.autotuned: the kernel overwrites its input with the gradient, so every timed trial must start from
    # the logits again (restore_value), which launch.autotuned's tuners do not ask for.
    configs = [c for c in _CONFIGS[cls] if launch.config_key(c) in names]
    return triton.autotune(configs=configs, key=["V", "DIVERGENCE"], restore_value=["s_ptr"])(_kd_rows_kernel)


def kd_rows(
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
    divergence: str,
    beta: float,
) -> torch.Tensor:
    """D per row (0 where `keep` is False) for student logits s and teacher logits t, both (rows, V) before the
    temperature; s is overwritten with d loss / d s = scale / T * dD/du (zero rows where not kept). `scale` is the
    0-d tensor T^2 / |R|; s and t are fp32, bf16 or fp16 with unit stride along V."""
    rows, V = s.shape
    if divergence not in DIVERGENCES or t.shape != s.shape or keep.shape != (rows,) or scale.numel() != 1:
        raise ValueError(f"kd_rows: divergence {divergence!r}, s {tuple(s.shape)}, t {tuple(t.shape)}, keep "
                         f"{tuple(keep.shape)}, scale of {scale.numel()} elements")  # fmt: skip
    if s.stride(1) != 1 or t.stride(1) != 1:
        raise ValueError("kd_rows: the logits blocks need unit stride along the vocabulary")
    d = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0 or V == 0:
        return d.zero_()
    args = (
        s, t, keep.to(torch.uint8), scale, d,
        V, s.stride(0), t.stride(0),
        1.0 / temperature, beta, math.log(beta), math.log1p(-beta),
    )  # fmt: skip
    flags = dict(DIVERGENCE=divergence, ROUND_BF16=backend.upcast_bf16_dots(s.dtype))
    if backend.interpreting():
        _kd_rows_kernel[(rows,)](*args, **flags, **_INTERPRETER)
        return d
    kernel, fixed = _launchable(shape_class(s.dtype))
    kernel[(rows,)](*args, **flags, **fixed)
    return d
