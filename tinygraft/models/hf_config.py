"""config.json <-> GPTConfig / BERTConfig: strict about architecture settings, tolerant of bookkeeping.

A setting that changes the architecture and that we do not implement is an error naming it (FIXED below, the
feed-forward width, GPT-2's attention scaling options, `position_embedding_type`, an activation we lack). Every
other key (`_name_or_path`, `transformers_version`, `dtype`, `use_cache`, generation settings, task-head dropout,
keys of newer versions) is accepted and returned as "unused", for `tinygraft info` to list.
"""

from pathlib import Path

from torch import nn

from tinygraft.core.jsonfile import read_json
from tinygraft.core.layers import ACTIVATIONS
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERTConfig, BERTForMaskedLM
from tinygraft.models.gpt import GPT, GPTConfig

CONFIG = "config.json"
MODEL_TYPES = {"gpt2": "gpt", "bert": "bert"}
ARCHITECTURES = {"GPT2LMHeadModel": "gpt", "GPT2Model": "gpt", "BertModel": "bert", "BertForMaskedLM": "bert"}
# Settings every supported config must have at these values (PretrainedConfig defaults): others change the model.
FIXED = {
    "is_decoder": (False, "a BERT decoder with causal attention"),
    "add_cross_attention": (False, "cross-attention layers"),
    "is_encoder_decoder": (False, "an encoder-decoder model"),
    "tie_word_embeddings": (True, "an output layer untied from the word embeddings"),
    "pruned_heads": ({}, "pruned attention heads"),
}


def read_config(path: str | Path) -> dict:
    """The config.json of a model directory, as a dict."""
    path = Path(path)
    if not path.exists():
        raise TinygraftError(f"pretrained path '{path}' does not exist")
    if not path.is_dir():
        raise TinygraftError(f"'{path}' is a file; give the model directory that holds config.json")
    file = path / CONFIG
    if not file.is_file():
        raise TinygraftError(f"'{path}' holds no config.json, so it is not a Hugging Face model directory")
    return read_json(file, "model config")


def family_of(raw: dict, where: str) -> str:
    """'gpt' or 'bert' from `model_type` (or, in old files without it, `architectures`)."""
    model_type = raw.get("model_type")
    if model_type is None:
        known = [ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in ARCHITECTURES]
        if known:
            return known[0]
        raise TinygraftError(f"{where} names no model_type; tinygraft reads 'gpt2' and 'bert' checkpoints")
    if model_type not in MODEL_TYPES:
        raise TinygraftError(
            f"{where} describes a {model_type!r} model; tinygraft reads only 'gpt2' and 'bert' checkpoints"
        )
    return MODEL_TYPES[model_type]


class _Keys:
    """Reads a config dict, remembering which keys were used; the rest is reported as accepted but unused."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where, self.used = raw, where, {"model_type", "architectures"}

    def get(self, key: str, default=None):
        self.used.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def require(self, key: str, wanted, meaning: str):
        value = self.get(key, wanted)
        if value != wanted:
            raise TinygraftError(f"{self.where} sets {key}={value!r} ({meaning}), which tinygraft does not implement")

    def activation(self, key: str, default: str, allowed: set[str]) -> str:
        act = self.get(key, default)
        if act not in ACTIVATIONS or ACTIVATIONS[act] not in allowed:
            ok = sorted(a for a, form in ACTIVATIONS.items() if form in allowed)
            raise TinygraftError(
                f"{self.where} sets {key}={act!r}, an activation tinygraft does not implement here "
                f"(known: {', '.join(ok)})"
            )
        return act

    def unused(self) -> dict:
        return {k: v for k, v in self.raw.items() if k not in self.used}


def config_from_hf(raw: dict, where: str = "config.json") -> tuple[GPTConfig | BERTConfig, dict]:
    """(our config, {key: value} accepted but unused) from a Hugging Face config dict."""
    fam = family_of(raw, where)
    k = _Keys(raw, where)
    for key, (wanted, meaning) in FIXED.items():
        k.require(key, wanted, meaning)
    if fam == "gpt":
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
    k.require("position_embedding_type", "absolute", "relative position embeddings")
    cfg = BERTConfig(
        vocab_size=k.get("vocab_size", 30522),
        max_position_embeddings=k.get("max_position_embeddings", 512),
        type_vocab_size=k.get("type_vocab_size", 2),
        n_layer=k.get("num_hidden_layers", 12),
        n_head=k.get("num_attention_heads", 12),
        n_embd=k.get("hidden_size", 768),
        intermediate_size=k.get("intermediate_size", 3072),
        dropout=k.get("hidden_dropout_prob", 0.1),
        attention_dropout=k.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=k.get("layer_norm_eps", 1e-12),
        pad_token_id=k.get("pad_token_id", 0),
        hidden_act=k.activation("hidden_act", "gelu", {"none", "tanh"}),
    )
    return cfg, k.unused()


def config_to_hf(model: nn.Module, eos_id: int | None = None) -> dict:
    """The Hugging Face config.json of a GPT, BERT or BERTForMaskedLM (with `architectures` and `model_type`)."""
    c = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if isinstance(model, GPT):
        if not c.bias:
            raise TinygraftError("a GPT with bias=False has no Hugging Face GPT-2 equivalent, so it cannot be exported")
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
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
            "dtype": dtype,
        }
    return {
        "architectures": ["BertForMaskedLM" if isinstance(model, BERTForMaskedLM) else "BertModel"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "dtype": dtype,
    }
