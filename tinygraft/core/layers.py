"""The building blocks GPT and BERT share: multi-head attention over the kernel, the GELU feed-forward, the KV cache,
and activation checkpointing of their blocks.

The models keep their own projection layers, named as in the Hugging Face checkpoints (GPT-2's fused `c_attn`,
BERT's separate `query`/`key`/`value`), so checkpoints and LoRA adapters map one to one. What happens between the
projections is written once, here.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinygraft.kernels import rng
from tinygraft.kernels.attention import flash_attention
from tinygraft.kernels.backend import backend_for
from tinygraft.kernels.bias_gelu import bias_gelu

LayerNorm = nn.LayerNorm


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the counter-based mask of kernels/rng.py (a seed from torch's RNG, the element's
    index): where each process of a data-parallel run holds a slice of the batch, the mask keys on the global row
    (rng.global_rows), so N processes drop what one process drops; torch's bernoulli masks would differ per rank."""
    if not training or p == 0.0:
        return x
    keep = rng.keep_mask_like(rng.new_seed(), tuple(x.shape), p, device=x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout's interface (and its place in a state dict: none) over `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# The activations a checkpoint may name (Hugging Face `hidden_act` / `activation_function` values).
ACTIVATIONS = {
    "gelu": "none",  # erf form: BERT
    "gelu_new": "tanh",  # tanh approximation: GPT-2
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}


def init_weights(module: nn.Module, std: float = 0.02):
    """GPT-2's and BERT's initialisation: N(0, std) weights, zero biases, zero padding embedding, unit LayerNorm.

    Use as `model.apply(init_weights)`.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def linear_gelu(x: torch.Tensor, linear: nn.Module, approximate: str) -> torch.Tensor:
    """gelu(x @ W.T + b): the first half of a transformer feed-forward.

    On the Triton path a plain nn.Linear with a bias runs the matmul alone and the bias add + GELU as one fused
    kernel (one pass over the (tokens x 4C) activation instead of two). Elsewhere (the CPU, where addmm already folds
    the bias in, or a wrapped LoRA layer) it is the plain composition.
    """
    if type(linear) is nn.Linear and linear.bias is not None and backend_for(x) == "triton":
        return bias_gelu(F.linear(x, linear.weight), linear.bias, approximate)
    return gelu(linear(x), approximate)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    Preallocated as (B, H, max_len, D) per layer; `length` counts the cached positions. Each layer writes its new
    keys/values at [length, length + T) and attends over [0, length + T); the model advances `length` once per
    forward, after the last layer. A prefix-tuning prefix is cached like tokens; `prefix` says how many of the first
    slots it holds (slots that take no positions unless the adapter numbers the real tokens after it).
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0
        self.prefix = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_head: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    kv_cache: KVCache | None = None,
    layer: int = 0,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, T, C) queries, keys, values -> (B, T, C) attention output, heads merged, before the output projection.
    `prefix`: (B, H, N, D) keys and values put before this layer's own (prefix tuning; key_padding_mask then covers
    N + T keys)."""
    B, T, C = q.shape
    hs = C // n_head
    q = q.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, n_head, hs).transpose(1, 2)
    v = v.view(B, T, n_head, hs).transpose(1, 2)
    if prefix is not None:  # causal masking is aligned bottom-right, so every query sees the whole prefix
        k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
    y = flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(B, T, C)


# ------------------------------------------------------------------------------------------ activation checkpointing
# Attributes that adapter layers (peft/adapters.py) read in their forward and that code outside the model sets:
# which adapter runs, and in a mixed batch each row's. A block recomputed in backward sees the values its forward saw.
CALL_STATE = ("active_adapter", "row_adapters")


def set_activation_checkpointing(model: nn.Module, on: bool) -> int:
    """Turn activation checkpointing on or off in every GPT / BERT inside `model` (a TaskModel's backbone, a
    BERTForMaskedLM's encoder); returns how many models took it."""
    found = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    for m in found:
        m.activation_checkpointing = on
    return len(found)


def run_block(block: nn.Module, checkpointed: bool, *args) -> torch.Tensor:
    """block(*args); with `checkpointed`, in training and with grad on, its activations are not kept for backward
    but recomputed there from the inputs (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): less
    memory, about one more forward of compute.

    Non-reentrant checkpointing (use_reentrant=False): gradients reach every tensor the block reads, parameters and
    inputs alike, so a prefix-tuning prefix trains behind frozen blocks (reentrant checkpointing with frozen inputs
    gives it none: peft#869, adapters#732). The RNG state is saved and restored for the recomputation, so dropout --
    nn.Dropout's and the seeds our attention and LoRA kernels draw from torch's RNG (kernels/rng.py) -- repeats the
    forward's masks. The adapter selection (CALL_STATE) is replayed too, so a mixed batch's backward may run after
    its `with` block. The caller never checkpoints a forward that writes a KV cache (recomputing would write again).
    """
    if not (checkpointed and block.training and torch.is_grad_enabled()):
        return block(*args)
    if torch.compiler.is_compiling():  # the traced graph fixes the adapter selection itself
        return checkpoint(block, *args, use_reentrant=False)
    return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: _replay_call_state(block))


def _replay_call_state(block: nn.Module):
    """(forward context, recomputation context): the second sets CALL_STATE as the forward found it, then puts back
    what it is at backward time."""
    seen = [(m, name, getattr(m, name)) for m in block.modules() for name in CALL_STATE if hasattr(m, name)]

    @contextlib.contextmanager
    def replay():
        now = [getattr(m, name) for m, name, _ in seen]
        for m, name, value in seen:
            setattr(m, name, value)
        try:
            yield
        finally:
            for (m, name, _), value in zip(seen, now):
                setattr(m, name, value)

    return contextlib.nullcontext(), replay()
