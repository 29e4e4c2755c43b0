"""GPT-2, written out: read it top to bottom (attention -> MLP -> block -> config -> model -> generation).

The architecture is GPT-2's exactly (Radford et al., 2019): learned absolute positions, pre-LayerNorm blocks, GELU
with the tanh approximation, one fused qkv projection, biases everywhere, a final LayerNorm, and an LM head tied to
the token embedding. Module names match Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn`, ...), so a
checkpoint or a LoRA adapter maps one to one; the last section maps the few differences (their Conv1D stores
weights transposed) and reads and writes GPT-2's config.json.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.layers import (
    Dropout,
    KVCache,
    LayerNorm,
    init_weights,
    linear_gelu,
    multi_head_attention,
    run_block,
)
from tinygraft.errors import TinygraftError
from tinygraft.models import hf
from tinygraft.peft.prompt import virtual_tokens_of


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "GPTConfig", layer: int):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer = layer

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, prefix=None) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)  # each (B, T, C)
        p = self.dropout if self.training else 0.0
        y = multi_head_attention(
            q, k, v, self.n_head, causal=True, dropout_p=p, kv_cache=kv_cache, layer=self.layer, prefix=prefix
        )
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(linear_gelu(x, self.c_fc, "tanh")))


class Block(nn.Module):
    def __init__(self, config: "GPTConfig", layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, prefix=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, prefix)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE vocabulary; set from the tokenizer when training a new one
    block_size: int = 1024  # learned positions: the longest sequence the model can read
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # head dim = n_embd // n_head, one of 16, 32, 64, 128
    dropout: float = 0.0  # residual, embedding and attention dropout (0 for pre-training small models)
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise TinygraftError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_embd // self.n_head not in (16, 32, 64, 128):
            raise TinygraftError(f"head dim n_embd/n_head = {self.n_embd // self.n_head} must be 16, 32, 64 or 128")
        for name in ("vocab_size", "block_size", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise TinygraftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise TinygraftError(f"dropout must be in [0, 1), got {self.dropout}")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf, 2017), as GPT-2
        self.activation_checkpointing = False  # recompute each block in backward (core/layers.py: run_block)
        self.apply(init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head tied to the token embeddings: LoRA's "all-linear" leaves it alone, as peft does."""
        return self.lm_head

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final hidden states (after ln_f).

        With a prompt-tuning adapter its N virtual tokens go first (positions 0..N-1) and their outputs are dropped;
        with a prefix-tuning adapter each block attends over its prefix too. Under a KV cache both are read once,
        by the first forward, and cached like tokens."""
        B, T = idx.shape
        virtual = virtual_tokens_of(self.transformer.wte)
        fresh = kv_cache is None or kv_cache.length == 0
        prompt = virtual.input_prompt(B) if virtual is not None and fresh else None
        prefixes = virtual.layer_prefixes(B) if virtual is not None and fresh else None
        n_prompt = prompt.shape[1] if prompt is not None else 0
        n_prefix, after = virtual.prefix_count() if virtual is not None else (0, False)
        cached = kv_cache.length - kv_cache.prefix if kv_cache is not None and not fresh else 0
        start = cached + (n_prefix if after else 0)
        if start + n_prompt + T > self.config.block_size:
            virt = n_prompt + (n_prefix if after else 0)
            extra = f" and the adapter's {virt} virtual tokens" if virt else ""
            raise TinygraftError(
                f"sequence of {cached + T} tokens{extra} is longer than the model's {self.config.block_size} positions"
            )
        pos = torch.arange(start, start + n_prompt + T, device=idx.device)
        tokens = self.transformer.wte(idx)
        if prompt is not None:
            tokens = torch.cat([prompt.to(tokens.dtype), tokens], dim=1)
        x = self.transformer.drop(tokens + self.transformer.wpe(pos))  # (B, N + T, C)
        checkpointed = self.activation_checkpointing and kv_cache is None  # a cache is written once, not recomputed
        for i, block in enumerate(self.transformer.h):
            x = run_block(block, checkpointed, x, kv_cache, prefixes[i] if prefixes is not None else None)
        if kv_cache is not None:
            if prefixes is not None:
                kv_cache.prefix = n_prefix
                kv_cache.length += n_prefix
            kv_cache.length += n_prompt + T
        return self.transformer.ln_f(x[:, n_prompt:] if n_prompt else x)

    def virtual_positions(self) -> tuple[int, int]:
        """(positions the active prompt or prefix takes, cache slots a prefix takes)."""
        virtual = virtual_tokens_of(self.transformer.wte)
        if virtual is None:
            return 0, 0
        n_prefix, after = virtual.prefix_count()
        return virtual.virtual_count() + (n_prefix if after else 0), n_prefix

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy over targets != -100."""
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        max_len = max_len or c.block_size + self.virtual_positions()[1]
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, p.device, p.dtype)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T). temperature 0 is greedy decoding."""
        cache = self.new_kv_cache(idx.shape[0]) if use_cache else None
        room = self.config.block_size - self.virtual_positions()[0]  # real tokens that fit beside a prompt
        if room < 2:
            raise TinygraftError(f"the adapter's virtual tokens leave {room} of the model's positions for text")
        pending, read = idx, 0  # tokens the model has not read yet; real tokens in the cache
        for _ in range(max_new_tokens):
            if cache is not None and read + pending.shape[1] > room:
                cache.length = cache.prefix = read = 0  # window full: re-read the last room - 1 tokens from scratch
                pending = idx[:, -(room - 1) :]
            if cache is None:
                pending = idx[:, -room:]
            logits, _ = self(pending, kv_cache=cache)
            read += pending.shape[1]
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id], dim=1)
            pending = next_id if cache is not None else idx
        return idx

    # Hugging Face layout (GPT2LMHeadModel / GPT2Model directories): see the end of this file.
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "GPT":
        """A GPT-2 directory as transformers writes it; `model.load_report` says what was accepted but unused."""
        raw = hf.read_config(path)
        where = f"config.json in '{path}'"
        hf.check_model_type(raw, where, HF_MODEL_TYPE, HF_ARCHITECTURES, "GPT-2")
        config, unused = config_from_hf(raw, where)
        with torch.device("cpu"):
            model = cls(config)
        report = hf.LoadReport(str(path), "gpt", list(raw.get("architectures") or []), unused)
        hf.load_weights(model, path, report, from_hf_name, is_conv1d_weight)
        model = model.to(dtype) if dtype is not None else model
        model.load_report = report
        return model.eval()

    def save_pretrained(self, path, tokenizer=None, max_shard_size: int | str | None = None) -> Path:
        eos = None
        if tokenizer is not None:
            hf.check_tokenizer(tokenizer, self.config.vocab_size, f"the tokenizer given for '{path}'")
            eos = tokenizer.eos_id
        tensors = hf_tensors(self)
        return hf.save_dir(path, config_to_hf(self, eos), tensors, tokenizer, self.config.block_size, max_shard_size)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """(B, V) logits -> (B, 1) token ids, with temperature, top-k and nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator)
    except RuntimeError:  # checked only on failure: a check per token would wait on the GPU every token
        if torch.isfinite(probs).all():
            raise
        raise TinygraftError(
            "the model's next-token scores hold NaN or infinity, so there is nothing to sample from"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face layout. Names are ours with these differences: `transformer.` is optional (GPT2Model files lack
# it); HF's Conv1D stores `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` weights as (in, out), transposed
# from nn.Linear's (out, in); the causal-mask buffers `attn.bias` / `attn.masked_bias` of old files are not weights;
# `lm_head.weight` is the tied `wte`.

HF_MODEL_TYPE = "gpt2"
HF_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def is_conv1d_weight(name: str) -> bool:
    return bool(_CONV1D.search(name))


def from_hf_name(name: str) -> str | None:
    """Our state_dict name for a tensor of a GPT-2 file, or None for one we accept and do not use."""
    name = name.removeprefix("transformer.")
    if re.search(r"(^|\.)attn\.(bias|masked_bias)$", name) or name == "lm_head.weight":
        return None  # causal-mask buffers; the LM head is the tied wte
    if name.split(".")[0] in ("wte", "wpe", "h", "ln_f"):
        return "transformer." + name
    return None  # other heads (score.*, multiple_choice_head.*)


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our tensors under GPT-2's names: the tied head once (as wte), Conv1D weights transposed."""
    out = {}
    for name, t in hf.own_tensors(model).items():
        t = t.detach()
        out[name] = (t.t() if is_conv1d_weight(name) else t).contiguous().cpu()
    return out


def config_from_hf(raw: dict, where: str = "config.json") -> tuple[GPTConfig, dict]:
    """(GPTConfig, {key: value} accepted but unused) from a GPT-2 config.json: strict where a setting changes the
    architecture (the feed-forward width, attention scaling, the activation), tolerant of everything else."""
    k = hf.ConfigKeys(raw, where)
    n_embd = k.get("n_embd", 768)
    k.require("n_inner", 4 * n_embd, "a feed-forward width other than 4 * n_embd")
    k.require("scale_attn_weights", True, "unscaled attention scores")
    k.require("scale_attn_by_inverse_layer_idx", False, "attention scaled by the layer index")
    k.activation("activation_function", "gelu_new", {"tanh"})
    dropout = k.get("resid_pdrop", 0.1)
    for other in ("embd_pdrop", "attn_pdrop"):  # one rate serves all three; a different one stays reported
        if raw.get(other, dropout) == dropout:
            k.used.add(other)
    cfg = GPTConfig(
        vocab_size=k.get("vocab_size", 50257),
        block_size=k.get("n_positions", raw.get("n_ctx", 1024)),
        n_layer=k.get("n_layer", 12),
        n_head=k.get("n_head", 12),
        n_embd=n_embd,
        dropout=dropout,
        bias=True,
        layer_norm_eps=k.get("layer_norm_epsilon", 1e-5),
    )
    k.used.add("n_ctx")
    return cfg, k.unused()


def config_to_hf(model: GPT, eos_id: int | None = None) -> dict:
    """GPT2LMHeadModel's config.json for this model."""
    c = model.config
    if not c.bias:
        raise TinygraftError("a GPT with bias=False has no Hugging Face GPT-2 equivalent, so it cannot be exported")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,  # GPT-2 uses <|endoftext|> for both; None when no tokenizer says which id
        "eos_token_id": eos_id,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
