"""BERT, written out: embeddings -> self-attention -> feed-forward -> layer -> encoder -> pooler -> MLM head.

The architecture is BERT's exactly (Devlin et al., 2019): word + position + token-type embeddings summed and
normalised, post-LayerNorm encoder layers (residual add, then LayerNorm), GELU in its erf form, a tanh pooler over
the [CLS] position, and a masked-LM head (dense + GELU + LayerNorm transform, decoder tied to the word embeddings, a
free output bias). Module names match Hugging Face's `BertModel` / `BertForMaskedLM`, so checkpoints and LoRA adapters
map one to one; MiniLM-style models are BERTs with other sizes.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.layers import ACTIVATIONS, LayerNorm, init_weights, linear_gelu, multi_head_attention
from tinygraft.errors import TinygraftError


@dataclass
class BERTConfig:
    vocab_size: int = 30522  # bert-base-uncased's WordPiece vocabulary
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segment A / segment B
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # hidden size; head dim = n_embd // n_head, one of 16, 32, 64, 128
    intermediate_size: int = 3072
    dropout: float = 0.1  # hidden dropout (embeddings, residual branches)
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"  # "gelu" is the erf form; the tanh forms are accepted too

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise TinygraftError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_embd // self.n_head not in (16, 32, 64, 128):
            raise TinygraftError(f"head dim n_embd/n_head = {self.n_embd // self.n_head} must be 16, 32, 64 or 128")
        if self.hidden_act not in ACTIVATIONS:
            raise TinygraftError(f"hidden_act {self.hidden_act!r} is not implemented (known: {', '.join(ACTIVATIONS)})")
        for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "n_layer", "intermediate_size"):
            if getattr(self, name) < 1:
                raise TinygraftError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TinygraftError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class BERTEmbeddings(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.n_embd)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.LayerNorm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.max_positions:
            raise TinygraftError(f"sequence of {T} tokens is longer than the model's {self.max_positions} positions")
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))  # (B, T, C)


class BERTSelfAttention(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = self.query(x), self.key(x), self.value(x)
        return multi_head_attention(q, k, v, self.n_head, causal=False, key_padding_mask=key_padding_mask, dropout_p=p)


class ResidualLayerNorm(nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm: the post-LN step after attention and after the MLP."""

    def __init__(self, d_in: int, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, config.n_embd)
        self.LayerNorm = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BERTAttention(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.self = BERTSelfAttention(config)
        self.output = ResidualLayerNorm(config.n_embd, config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, key_padding_mask), x)


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

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(x, key_padding_mask)
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

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BERTOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None  # (B, T), True = real
        x = self.embeddings(input_ids, token_type_ids)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x, key_padding_mask)
            if states is not None:
                states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else x[:, 0]
        return BERTOutput(x, pooled, tuple(states) if states is not None else None)

    # Hugging Face layout (BertModel directories, `bert.` prefix optional); the mapping lives in models/hf.py.
    @classmethod
    def from_pretrained(cls, path, new_head: bool = False, dtype: torch.dtype | None = None) -> "BERT":
        """A missing pooler stays absent (pooled = the [CLS] state) unless new_head=True initialises one."""
        from tinygraft.models import hf

        model, model.load_report = hf.load_pretrained_model(path, "bert", new_head=new_head, dtype=dtype)
        return model

    def save_pretrained(self, path, tokenizer=None):
        from tinygraft.models import hf

        return hf.save_pretrained_model(self, path, tokenizer)


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

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = config
        self.bert = BERT(config, add_pooler=False)
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
        from tinygraft.models import hf

        model, model.load_report = hf.load_pretrained_model(path, "mlm", new_head=new_head, dtype=dtype)
        return model

    def save_pretrained(self, path, tokenizer=None):
        from tinygraft.models import hf

        return hf.save_pretrained_model(self, path, tokenizer)
