"""BERT, written out: embeddings -> self-attention -> feed-forward -> layer -> encoder -> pooler -> MLM head.

The architecture is BERT's exactly (Devlin et al., 2019): word + position + token-type embeddings summed and
normalised, post-LayerNorm encoder layers (residual add, then LayerNorm), GELU in its erf form, a tanh pooler over
the [CLS] position, and a masked-LM head (dense + GELU + LayerNorm transform, decoder tied to the word embeddings, a
free output bias). Module names match Hugging Face's `BertModel` / `BertForMaskedLM`, so checkpoints and LoRA adapters
map one to one; MiniLM-style models are BERTs with other sizes. The last section maps the few differences of BERT
files (an optional `bert.` prefix, heads that may be absent, TF-era names) and reads and writes their config.json;
RoBERTa and DistilBERT files are BERTs too, with the differences models/bert_family.py lists.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.layers import (
    ACTIVATIONS,
    Dropout,
    LayerNorm,
    init_weights,
    linear_gelu,
    multi_head_attention,
    run_block,
)
from tinygraft.errors import TinygraftError
from tinygraft.models import bert_family, hf
from tinygraft.peft.prompt import virtual_tokens_of


@dataclass
class BERTConfig:
    vocab_size: int = 30522  # bert-base-uncased's WordPiece vocabulary
    max_position_embeddings: int = 512  # the positions a sequence may use (the table has position_offset more rows)
    type_vocab_size: int = 2  # segment A / segment B; 1 for RoBERTa, 0 for none (DistilBERT reads no token types)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # hidden size; head dim = n_embd // n_head, one of 16, 32, 64, 128
    intermediate_size: int = 3072
    dropout: float = 0.1  # hidden dropout (embeddings, residual branches)
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"  # "gelu" is the erf form; the tanh forms are accepted too
    # RoBERTa numbers positions past the padding id: 0 (BERT's arange), or pad_token_id + 1 (models/bert_family.py).
    position_offset: int = 0
    hf_model_type: str = "bert"  # the layout save_pretrained writes: "bert", "roberta" or "distilbert"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise TinygraftError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_embd // self.n_head not in (16, 32, 64, 128):
            raise TinygraftError(f"head dim n_embd/n_head = {self.n_embd // self.n_head} must be 16, 32, 64 or 128")
        if self.hidden_act not in ACTIVATIONS:
            raise TinygraftError(f"hidden_act {self.hidden_act!r} is not implemented (known: {', '.join(ACTIVATIONS)})")
        for name in ("vocab_size", "max_position_embeddings", "n_layer", "intermediate_size"):
            if getattr(self, name) < 1:
                raise TinygraftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.type_vocab_size < 0:
            raise TinygraftError(f"type_vocab_size must be 0 (no token types) or more, got {self.type_vocab_size}")
        if self.position_offset not in (0, self.pad_token_id + 1):
            raise TinygraftError(
                f"position_offset must be 0 or pad_token_id + 1 = {self.pad_token_id + 1} (RoBERTa's numbering), got "
                f"{self.position_offset}"
            )
        bert_family.check_config(self)
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TinygraftError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class BERTEmbeddings(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd, padding_idx=config.pad_token_id)
        # RoBERTa's pad tokens sit at position pad_token_id, a row its training never updates (padding_idx)
        offset, pad = config.position_offset, config.pad_token_id
        rows = config.max_position_embeddings + offset
        self.position_embeddings = nn.Embedding(rows, config.n_embd, padding_idx=pad if offset else None)
        types = config.type_vocab_size
        self.token_type_embeddings = nn.Embedding(types, config.n_embd) if types else None
        self.LayerNorm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.max_positions, self.offset, self.pad_id = config.max_position_embeddings, offset, pad

    def forward(self, input_ids, token_type_ids, prompt: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """(B, T) ids -> (B, N + T, C): a prompt's N vectors (prompt tuning) first, at positions from `start`."""
        T = input_ids.shape[1]
        words = self.word_embeddings(input_ids)
        if prompt is not None:  # virtual tokens are segment A, as peft's (which drops token types) are
            words = torch.cat([prompt.to(words.dtype), words], dim=1)
            token_type_ids = F.pad(token_type_ids, (prompt.shape[1], 0)) if token_type_ids is not None else None
        if start + words.shape[1] > self.max_positions:
            virt = start + words.shape[1] - T
            extra = f" and the adapter's {virt} virtual tokens" if virt else ""
            limit = self.max_positions
            raise TinygraftError(f"sequence of {T} tokens{extra} is longer than the model's {limit} positions")
        pos = torch.arange(start, start + words.shape[1], device=input_ids.device) + self.offset
        if self.offset and prompt is None:  # RoBERTa numbers real tokens only, pads at the padding row, as HF does
            real = input_ids.ne(self.pad_id)  # (a prompt's embeddings get HF's plain arange above instead)
            pos = (torch.cumsum(real, dim=1) + start) * real + self.pad_id  # (B, T)
        x = words + self.position_embeddings(pos)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))  # (B, N + T, C)


class BERTSelfAttention(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, prefix=None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = self.query(x), self.key(x), self.value(x)
        return multi_head_attention(
            q, k, v, self.n_head, causal=False, key_padding_mask=key_padding_mask, dropout_p=p, prefix=prefix
        )


class ResidualLayerNorm(nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm: the post-LN step after attention and after the MLP."""

    def __init__(self, d_in: int, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, config.n_embd)
        self.LayerNorm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BERTAttention(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.self = BERTSelfAttention(config)
        self.output = ResidualLayerNorm(config.n_embd, config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, prefix=None) -> torch.Tensor:
        return self.output(self.self(x, key_padding_mask, prefix), x)


class BERTIntermediate(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.intermediate_size)
        self.approximate = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.dense, self.approximate)


class BERTLayer(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.attention = BERTAttention(config)
        self.intermediate = BERTIntermediate(config)
        self.output = ResidualLayerNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, prefix=None) -> torch.Tensor:
        h = self.attention(x, key_padding_mask, prefix)
        return self.output(self.intermediate(h), h)


class BERTEncoder(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.layer = nn.ModuleList([BERTLayer(config) for _ in range(config.n_layer)])


class BERTPooler(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # the [CLS] position


class BERTOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, C)
    pooled: torch.Tensor  # (B, C)
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings output + each layer's, when asked for


class BERT(nn.Module):
    """The encoder with its pooler, as Hugging Face's `BertModel`."""

    def __init__(self, config: BERTConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BERTEmbeddings(config)
        self.encoder = BERTEncoder(config)
        self.pooler = BERTPooler(config) if add_pooler else None
        self.apply(init_weights)
        self.activation_checkpointing = False  # recompute each layer in backward (core/layers.py: run_block)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BERTOutput:
        if token_type_ids is None or self.config.type_vocab_size == 0:  # DistilBERT reads none
            token_type_ids = torch.zeros_like(input_ids) if self.config.type_vocab_size else None
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None  # (B, T), True = real
        B = input_ids.shape[0]
        # Prompt or prefix tuning (peft/prompt.py): virtual tokens every real one sees, dropped from the outputs.
        virtual = virtual_tokens_of(self.embeddings.word_embeddings)
        prompt = virtual.input_prompt(B) if virtual is not None else None
        prefixes = virtual.layer_prefixes(B) if virtual is not None else None
        n_prefix, after = virtual.prefix_count() if virtual is not None else (0, False)
        x = self.embeddings(input_ids, token_type_ids, prompt, n_prefix if after else 0)
        n_prompt = x.shape[1] - input_ids.shape[1]
        n_seen = n_prompt + (n_prefix if prefixes is not None else 0)
        if key_padding_mask is not None and n_seen:
            key_padding_mask = F.pad(key_padding_mask, (n_seen, 0), value=True)
        real = (lambda h: h[:, n_prompt:]) if n_prompt else (lambda h: h)  # noqa: E731
        states = [real(x)] if output_hidden_states else None
        for i, layer in enumerate(self.encoder.layer):
            prefix = prefixes[i] if prefixes is not None else None
            x = run_block(layer, self.activation_checkpointing, x, key_padding_mask, prefix)
            if states is not None:
                states.append(real(x))
        x = real(x)
        pooled = self.pooler(x) if self.pooler is not None else x[:, 0]
        return BERTOutput(x, pooled, tuple(states) if states is not None else None)

    # Hugging Face layout (BertModel directories, `bert.` prefix optional): see the end of this file.
    @classmethod
    def from_pretrained(cls, path, new_head: bool = False, dtype: torch.dtype | None = None) -> "BERT":
        """A missing pooler stays absent (pooled = the [CLS] state) unless new_head=True initialises one."""
        return load_hf(path, "bert", new_head, dtype)

    def save_pretrained(self, path, tokenizer=None, max_shard_size: int | str | None = None) -> Path:
        return save_hf(self, path, tokenizer, max_shard_size)


class MLMTransform(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.LayerNorm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.approximate = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(linear_gelu(x, self.dense, self.approximate))


class MLMPredictions(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.transform = MLMTransform(config)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class MLMHead(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.predictions = MLMPredictions(config)


class BERTForMaskedLM(nn.Module):
    """BERT with the masked-LM head, as Hugging Face's `BertForMaskedLM` (which has no pooler)."""

    def __init__(self, config: BERTConfig, bert: BERT | None = None):
        """`bert`: an encoder to wrap (its weights kept, a fresh head tied to them), e.g. a fine-tuning backbone."""
        super().__init__()
        self.config = config
        self.bert = bert if bert is not None else BERT(config, add_pooler=False)
        self.cls = MLMHead(config)
        self.cls.apply(init_weights)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_output_embeddings(self) -> nn.Linear:
        """The decoder tied to the word embeddings: LoRA's "all-linear" leaves it alone, as peft does."""
        return self.cls.predictions.decoder

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """Logits (B, T, vocab) and, given labels (B, T), the mean cross-entropy over labels != -100."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.cls.predictions(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    @classmethod
    def from_pretrained(cls, path, new_head: bool = False, dtype: torch.dtype | None = None) -> "BERTForMaskedLM":
        """A file without the masked-LM head is an error unless new_head=True initialises one."""
        return load_hf(path, "mlm", new_head, dtype)

    def save_pretrained(self, path, tokenizer=None, max_shard_size: int | str | None = None) -> Path:
        return save_hf(self, path, tokenizer, max_shard_size)


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face layout. Names are ours with these differences: `bert.` is optional (BertModel files lack it);
# the pooler and the MLM head (`cls.predictions.*`) may each be absent; `cls.predictions.decoder.weight` is the word
# embedding and `.decoder.bias` is `cls.predictions.bias`; `embeddings.position_ids`, `cls.seq_relationship.*` (the
# next-sentence head) and other task heads are accepted and unused; TF-converted files say LayerNorm `gamma`/`beta`.
# RoBERTa and DistilBERT files load into the same classes: their names and config keys are in models/bert_family.py,
# and each function here hands a `model_type` other than "bert" to it.

HF_MODEL_TYPE = "bert"
HF_ARCHITECTURES = ("BertModel", "BertForMaskedLM")
MODEL_TYPES = (HF_MODEL_TYPE, *bert_family.LAYOUTS)  # what BERT reads: "bert", "roberta", "distilbert"


def model_type_of(raw: dict, where: str) -> str:
    """Which of MODEL_TYPES a config.json describes (from `architectures` in old files without `model_type`)."""
    given = raw.get("model_type")
    if given in MODEL_TYPES:
        return given
    archs = HF_ARCHITECTURES + tuple(bert_family.ARCHITECTURES)
    hf.check_model_type(raw, where, HF_MODEL_TYPE, archs, "BERT")  # refuses another model, or none named
    return next(bert_family.ARCHITECTURES.get(a, HF_MODEL_TYPE) for a in raw["architectures"] if a in archs)


def from_hf_name(name: str, target: str, model_type: str = HF_MODEL_TYPE) -> str | None:
    """Our state_dict name for a tensor of a BERT file, or None for one we accept and do not use. `target` is "bert"
    (the encoder, as `BertModel`) or "mlm" (`BertForMaskedLM`, which has no pooler)."""
    if model_type != HF_MODEL_TYPE:
        return bert_family.from_hf_name(name, target, model_type)
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
    name = name.removeprefix("bert.")
    top = name.split(".")[0]
    if name in ("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight"):
        return None  # buffers; the decoder is the tied word embedding
    if top in ("embeddings", "encoder", "pooler"):
        if top == "pooler" and target == "mlm":
            return None
        return name if target == "bert" else "bert." + name
    if name.startswith("cls.predictions.") and target == "mlm":
        return "cls.predictions.bias" if name == "cls.predictions.decoder.bias" else name
    return None  # cls.* for a plain BERT, cls.seq_relationship.*, classifier.*, qa_outputs.*


def hf_heads(names, model_type: str = HF_MODEL_TYPE) -> dict[str, bool]:
    """Which heads a BERT file holds: the pooler, the masked-LM head."""
    if model_type != HF_MODEL_TYPE:
        return bert_family.hf_heads(names, model_type)
    names = list(names)
    return {
        "pooler": any(n.removeprefix("bert.").startswith("pooler.") for n in names),
        "mlm": any(n.startswith("cls.predictions.transform.") for n in names),
    }


def load_hf(path, target: str, new_head: bool = False, dtype: torch.dtype | None = None):
    """BERT ("bert") or BERTForMaskedLM ("mlm") from a BERT directory. A head the file lacks is an error for the
    masked-LM model and an absence for the encoder, unless `new_head`, which initialises it fresh."""
    raw = hf.read_config(path)
    where = f"config.json in '{path}'"
    model_type = model_type_of(raw, where)
    config, unused = config_from_hf(raw, where)
    heads = hf_heads(hf.LazyWeights(Path(path)).shapes, model_type)
    report = hf.LoadReport(str(path), "bert", list(raw.get("architectures") or []), unused)
    if target == "mlm" and not heads["mlm"]:
        if not new_head:
            head = bert_family.LAYOUTS[model_type].head if model_type in bert_family.LAYOUTS else "cls.predictions."
            raise TinygraftError(
                f"'{path}' has no masked-LM head ({head}*); ask for a new head (new_head=True) to initialise one"
            )
        report.missing_heads.append("masked-LM head")
        report.new_heads.append("masked-LM head")
    has_pooler = model_type not in bert_family.LAYOUTS or bert_family.LAYOUTS[model_type].pooler
    if target == "bert" and not heads["pooler"] and has_pooler:  # DistilBERT has no place for one
        report.missing_heads.append("pooler")
        if new_head:
            report.new_heads.append("pooler")
    with torch.device("cpu"):
        pooler = heads["pooler"] or "pooler" in report.new_heads
        model = BERTForMaskedLM(config) if target == "mlm" else BERT(config, add_pooler=pooler)
    fresh = ("cls.",) if "masked-LM head" in report.new_heads else ("pooler.",) if report.new_heads else ()
    hf.load_weights(model, path, report, lambda name: from_hf_name(name, target, model_type), fresh=fresh)
    if "masked-LM head" in report.new_heads:
        model.cls.apply(init_weights)  # the decoder is tied: re-initialising it would touch the embeddings
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    model = model.to(dtype) if dtype is not None else model
    model.load_report = report
    return model.eval()


def save_hf(model: "BERT | BERTForMaskedLM", path, tokenizer=None, max_shard_size: int | str | None = None) -> Path:
    if tokenizer is not None:
        where = f"the tokenizer given for '{path}'"
        hf.check_tokenizer(tokenizer, model.config.vocab_size, where, pad_id=model.config.pad_token_id)
    tensors = {n: t.detach().contiguous().cpu() for n, t in hf.own_tensors(model).items()}
    if model.config.hf_model_type != HF_MODEL_TYPE:
        tensors = bert_family.to_hf_names(tensors, model.config.hf_model_type, isinstance(model, BERTForMaskedLM))
    positions = model.config.max_position_embeddings
    return hf.save_dir(path, config_to_hf(model), tensors, tokenizer, positions, max_shard_size)


def config_from_hf(raw: dict, where: str = "config.json") -> tuple[BERTConfig, dict]:
    """(BERTConfig, {key: value} accepted but unused) from a BERT config.json: strict where a setting changes the
    architecture (`position_embedding_type` other than absolute, an activation we lack), tolerant of the rest."""
    k, model_type = hf.ConfigKeys(raw, where), model_type_of(raw, where)
    if model_type != HF_MODEL_TYPE:
        return BERTConfig(**bert_family.LAYOUTS[model_type].read(k)), k.unused()
    k.require("position_embedding_type", "absolute", "relative position embeddings")
    cfg = BERTConfig(
        vocab_size=k.get("vocab_size", 30522),
        max_position_embeddings=k.get("max_position_embeddings", 512),
        **bert_family.bert_fields(k),
        pad_token_id=k.get("pad_token_id", 0),
        hidden_act=k.activation("hidden_act", "gelu", {"none", "tanh"}),
    )
    return cfg, k.unused()


def config_to_hf(model: "BERT | BERTForMaskedLM", eos_id: int | None = None) -> dict:
    """BertModel's (or BertForMaskedLM's) config.json for this model, or its RoBERTa / DistilBERT equivalent."""
    c, dtype = model.config, str(next(model.parameters()).dtype).removeprefix("torch.")
    if c.hf_model_type != HF_MODEL_TYPE:
        return bert_family.config_to_hf(c, isinstance(model, BERTForMaskedLM), dtype)
    return {
        "architectures": ["BertForMaskedLM" if isinstance(model, BERTForMaskedLM) else "BertModel"],
        "model_type": HF_MODEL_TYPE,
        **bert_family.bert_keys(c),
        "dtype": dtype,
    }
