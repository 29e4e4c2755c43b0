"""Scaled dot-product attention with the contract every model in tinygraft calls.

    S = scale * Q K^T                      (B, Hq, T, S)   scale defaults to 1/sqrt(D)
    S[b, h, i, j] = -inf  where key j is padding (key_padding_mask False) or, if causal, j > i + (S_len - T)
    P = softmax(S) along j;  rows with no visible key give P = 0 and so output 0
    P = P * M / (1 - p)                     M from rng.keep_mask over index ((b*Hq + h)*T + i)*S_len + j
    O = P V

q is (B, Hq, T, D); k and v are (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention: query head h
reads key/value head h // (Hq // Hkv)). Causal masking is aligned bottom-right, so a decode step with T=1 query
against a KV cache of S keys sees all S of them. `key_padding_mask` is (B, S) bool, True = keep.

This module holds the public function, its dispatch and the PyTorch reference. The Triton kernel arrives behind the
same signature (issue: flash attention in Triton); until then every backend runs the reference.
"""

import math

import torch

from tinygraft.kernels import rng


def _check(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, Hkv, S, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, S) = ({B}, {k.shape[2]}); got {tuple(key_padding_mask.shape)}")


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


def flash_attention(q, k, v, causal=False, key_padding_mask=None, softmax_scale=None, dropout_p=0.0, seed=None):
    """Attention as the module docstring defines it. Draws a seed from torch's RNG when dropout needs one."""
    _check(q, k, v, key_padding_mask)
    if dropout_p > 0.0 and seed is None:
        seed = rng.new_seed()
    if dropout_p > 0.0:
        return attention_reference(q, k, v, causal, key_padding_mask, softmax_scale, dropout_p, seed)
    return _sdpa(q, k, v, causal, key_padding_mask, softmax_scale)
