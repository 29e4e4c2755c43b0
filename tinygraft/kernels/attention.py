"""Scaled dot-product attention with the contract every model in tinygraft calls.

    S = scale * Q K^T                      (B, Hq, T, S)   scale defaults to 1/sqrt(D)
    S[b, h, i, j] = -inf  where key j is padding (key_padding_mask False) or, if causal, j > i + (S_len - T)
    P = softmax(S) along j;  rows with no visible key give P = 0 and so output 0
    P = P * M / (1 - p)                     M from rng.keep_mask over index ((b*Hq + h)*T + i)*S_len + j
    O = P V

q is (B, Hq, T, D); k and v are (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention: query head h
reads key/value head h // (Hq // Hkv)). Causal masking is aligned bottom-right, so a decode step with T=1 query
against a KV cache of S keys sees all S of them. `key_padding_mask` is (B, S) bool, True = keep.

Backward (what the kernel computes; autograd gives the same through the reference):
    dV = P^T dO              dP = (dO V^T) * M / (1 - p)          delta = rowsum(dO * O)
    dS = P_softmax * (dP - delta)                                  dQ = scale dS K,   dK = scale dS^T Q
with a grouped key/value head's dK and dV summed over the query heads of its group.

This module holds the public function, its dispatch and the PyTorch reference. `backend_for(q, k, v)` picks the
Triton kernel (attention_triton.py: FlashAttention-2 forward and backward, imported only when it runs) or the
reference: `attention_reference` with dropout, torch's SDPA without. The Triton kernel takes head dims 16, 32, 64
and 128 in fp32, fp16 and bf16; any other head dim or dtype runs the reference, unless TINYGRAFT_BACKEND=triton
insists (an error then). Under autocast q, k and v are cast to the autocast dtype first, as a matmul's would be.
"""

import math

import torch

from tinygraft.errors import TinygraftError
from tinygraft.kernels import backend, rng

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise TinygraftError(f"q, k, v must be 4-d (B, H, T, D); got {shapes}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise TinygraftError(f"k and v must be (B, Hkv, S, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}")
    if Hq % k.shape[1]:
        raise TinygraftError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        got = tuple(key_padding_mask.shape)
        raise TinygraftError(f"key_padding_mask must be (B, S) = ({B}, {k.shape[2]}); got {got}")


def visible_mask(T: int, S: int, causal: bool, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """(B or 1, 1, T, S) bool, True where query i may see key j; None when every key is visible."""
    mask = None
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        mask = (j <= i + (S - T))[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def _expand_kv(k: torch.Tensor, Hq: int) -> torch.Tensor:
    groups = Hq // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def dropout_keep(seed: int, p: float, B: int, H: int, T: int, S: int, device) -> torch.Tensor:
    """The (B, H, T, S) keep-mask the kernel draws, index ((b*H + h)*T + i)*S + j."""
    return rng.keep_mask_like(seed, (B, H, T, S), p, device=device)


def attention_reference(q, k, v, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=0.0, seed=None):
    """Naive attention, the definition of the right answer (run it in float64 to check a kernel)."""
    _check(q, k, v, key_padding_mask)
    B, Hq, T, D = q.shape
    S = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    k, v = _expand_kv(k, Hq), _expand_kv(v, Hq)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, T, S)
    mask = visible_mask(T, S, causal, key_padding_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows with no visible key -> 0, not NaN
    if dropout_p > 0.0:
        keep = dropout_keep(seed, dropout_p, B, Hq, T, S, q.device)
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


def _sdpa(q, k, v, causal, key_padding_mask, softmax_scale):
    """torch's fused attention for the no-dropout reference path (same math as attention_reference)."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    k, v = _expand_kv(k, Hq), _expand_kv(v, Hq)
    if key_padding_mask is None and (not causal or T == S):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
    mask = visible_mask(T, S, causal, key_padding_mask, q.device)
    seen = mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    # A row with no visible key would softmax over nothing (NaN, and NaN gradients for every key); let it see
    # every key and zero its output instead.
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~seen, scale=softmax_scale)
    return out.masked_fill(~seen, 0.0)


def _use_triton(q, k, v) -> bool:
    if backend.backend_for(q, k, v) != "triton":
        return False
    if q.shape[-1] in TRITON_HEAD_DIMS and q.dtype in TRITON_DTYPES:
        return True
    if backend.forced_backend() == "triton":
        raise TinygraftError(
            f"the Triton attention kernel takes head dims {TRITON_HEAD_DIMS} in fp32/fp16/bf16, not "
            f"{q.shape[-1]} in {q.dtype}; unset TINYGRAFT_BACKEND=triton to run the reference"
        )
    return False


def flash_attention(q, k, v, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=0.0, seed=None):
    """Attention as the module docstring defines it. Draws a seed from torch's RNG when dropout needs one."""
    _check(q, k, v, key_padding_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise TinygraftError(f"attention dropout_p must be in [0, 1), got {dropout_p}")
    cast = backend.autocast_dtype(q.device.type)
    if cast is not None:
        q, k, v = q.to(cast), k.to(cast), v.to(cast)
    if not (q.dtype == k.dtype == v.dtype):
        raise TinygraftError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if dropout_p > 0.0 and seed is None:
        seed = rng.new_seed()
    if _use_triton(q, k, v):
        from tinygraft.kernels.attention_triton import flash_attention_triton

        seed = rng.kernel_seed(seed) if dropout_p > 0.0 else seed
        return flash_attention_triton(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p, seed)
    if dropout_p > 0.0:
        return attention_reference(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p, seed)
    return _sdpa(q, k, v, causal, key_padding_mask, softmax_scale)
