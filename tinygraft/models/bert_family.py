"""BERT's relatives in the Hugging Face layout: RoBERTa and DistilBERT files read into our BERT, and written back.

Both compute what models/bert.py computes (post-LN encoder layers, a masked-LM head tied to the word embeddings);
what differs is bookkeeping, kept here as data so bert.py stays one model:

    RoBERTa     positions numbered from pad_token_id + 1 and counting real tokens only, pads at position
                pad_token_id (BERTConfig.position_offset = pad_token_id + 1, so its config.json's
                max_position_embeddings is ours + pad_token_id + 1: 514 for 512); usually one token type; the
                masked-LM head is `lm_head.{dense, layer_norm, decoder, bias}` and applies the erf GELU whatever
                hidden_act says; a masked-LM file prefixes the encoder with `roberta.`; the pooler may be absent.
    DistilBERT  no token types (BERTConfig.type_vocab_size = 0) and no pooler; layers named
                `transformer.layer.N.attention.{q,k,v,out}_lin`, `sa_layer_norm`, `ffn.lin1/lin2`,
                `output_layer_norm`; the head `vocab_transform`, `vocab_layer_norm`, `vocab_projector` (tied, with its
                bias); config keys of its own (dim, n_layers, n_heads, hidden_dim, activation, ...); every LayerNorm
                eps 1e-12; a masked-LM file prefixes the encoder with `distilbert.`.

A layout maps tensor names both ways through one table of (our name prefix, its name prefix) pairs, `{i}` standing for
a layer number, and translates config.json to BERTConfig's fields and back. Settings that would change the
architecture and that we do not compute are refused by name, as for BERT. DistilBERT trains with one dropout fewer
than our BERT layer (none after the attention's out_lin); in eval mode the two are the same function.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

from tinygraft.errors import TinygraftError
from tinygraft.models import hf


@dataclass(frozen=True)
class Layout:
    model_type: str
    name: str  # how messages call it
    architectures: tuple[str, str]  # (the encoder's class, the masked LM's)
    prefix: str  # the encoder's names in a masked-LM file start with it
    names: tuple[tuple[str, str], ...]  # (ours, the file's) name prefixes; ours without `bert.`, `cls.` = MLM head
    also: tuple[tuple[str, str], ...]  # further file names read into ours (a second copy), never written
    unused: frozenset[str]  # buffers and the tied decoder: accepted, not read
    head: str  # a file name starting with it says the masked-LM head is there
    pooler: bool  # whether the layout has a place for a pooler
    read: Callable[[hf.ConfigKeys], dict]  # config.json -> BERTConfig fields
    write: Callable[[object], dict]  # BERTConfig -> config.json (less architectures, model_type, dtype)


def bert_fields(k: hf.ConfigKeys) -> dict:
    """The BERTConfig fields BERT's and RoBERTa's config.json name alike (sizes, dropouts, eps, token types)."""
    return dict(
        type_vocab_size=k.get("type_vocab_size", 2),
        n_layer=k.get("num_hidden_layers", 12),
        n_head=k.get("num_attention_heads", 12),
        n_embd=k.get("hidden_size", 768),
        intermediate_size=k.get("intermediate_size", 3072),
        dropout=k.get("hidden_dropout_prob", 0.1),
        attention_dropout=k.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=k.get("layer_norm_eps", 1e-12),
    )


def bert_keys(c) -> dict:
    """BERT's config.json keys for a BERTConfig, RoBERTa's too: its table holds position_offset more rows."""
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings + c.position_offset,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }


def _read_roberta(k: hf.ConfigKeys) -> dict:
    k.require("position_embedding_type", "absolute", "relative position embeddings")
    pad, rows = k.get("pad_token_id", 1), k.get("max_position_embeddings", 512)
    if rows <= pad + 1:
        raise TinygraftError(
            f"{k.where} sets max_position_embeddings={rows}, which leaves no position past pad_token_id={pad} "
            "(RoBERTa numbers positions from pad_token_id + 1)"
        )
    return dict(
        vocab_size=k.get("vocab_size", 50265),
        max_position_embeddings=rows - pad - 1,
        position_offset=pad + 1,
        **bert_fields(k),
        pad_token_id=pad,
        # the LM head's GELU is the erf form whatever hidden_act says, and ours follows hidden_act: only "gelu" agrees
        hidden_act=k.activation("hidden_act", "gelu", {"none"}),
        hf_model_type="roberta",
    )


def _write_roberta(c) -> dict:
    return bert_keys(c)


def _read_distilbert(k: hf.ConfigKeys) -> dict:
    k.require("sinusoidal_pos_embds", False, "fixed sinusoidal position embeddings")
    return dict(
        vocab_size=k.get("vocab_size", 30522),
        max_position_embeddings=k.get("max_position_embeddings", 512),
        type_vocab_size=0,
        n_layer=k.get("n_layers", 6),
        n_head=k.get("n_heads", 12),
        n_embd=k.get("dim", 768),
        intermediate_size=k.get("hidden_dim", 3072),
        dropout=k.get("dropout", 0.1),
        attention_dropout=k.get("attention_dropout", 0.1),
        layer_norm_eps=1e-12,  # fixed in DistilBERT's code, not a config key
        pad_token_id=k.get("pad_token_id", 0),
        hidden_act=k.activation("activation", "gelu", {"none", "tanh"}),
        hf_model_type="distilbert",
    )


def _write_distilbert(c) -> dict:
    return {
        "vocab_size": c.vocab_size,
        "dim": c.n_embd,
        "n_layers": c.n_layer,
        "n_heads": c.n_head,
        "hidden_dim": c.intermediate_size,
        "activation": c.hidden_act,
        "dropout": c.dropout,
        "attention_dropout": c.attention_dropout,
        "max_position_embeddings": c.max_position_embeddings,
        "sinusoidal_pos_embds": False,
        "pad_token_id": c.pad_token_id,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }


_ATT, _LAYER = "encoder.layer.{i}.attention.", "transformer.layer.{i}."
LAYOUTS = {
    "roberta": Layout(
        model_type="roberta",
        name="RoBERTa",
        architectures=("RobertaModel", "RobertaForMaskedLM"),
        prefix="roberta.",
        names=(
            ("embeddings.", "embeddings."),
            ("encoder.", "encoder."),
            ("pooler.", "pooler."),
            ("cls.predictions.transform.dense.", "lm_head.dense."),
            ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
            ("cls.predictions.bias", "lm_head.bias"),
        ),
        also=(("cls.predictions.bias", "lm_head.decoder.bias"),),
        unused=frozenset({"embeddings.position_ids", "embeddings.token_type_ids", "lm_head.decoder.weight"}),
        head="lm_head.dense.",
        pooler=True,
        read=_read_roberta,
        write=_write_roberta,
    ),
    "distilbert": Layout(
        model_type="distilbert",
        name="DistilBERT",
        architectures=("DistilBertModel", "DistilBertForMaskedLM"),
        prefix="distilbert.",
        names=(
            ("embeddings.word_embeddings.", "embeddings.word_embeddings."),
            ("embeddings.position_embeddings.", "embeddings.position_embeddings."),
            ("embeddings.LayerNorm.", "embeddings.LayerNorm."),
            (_ATT + "self.query.", _LAYER + "attention.q_lin."),
            (_ATT + "self.key.", _LAYER + "attention.k_lin."),
            (_ATT + "self.value.", _LAYER + "attention.v_lin."),
            (_ATT + "output.dense.", _LAYER + "attention.out_lin."),
            (_ATT + "output.LayerNorm.", _LAYER + "sa_layer_norm."),
            ("encoder.layer.{i}.intermediate.dense.", _LAYER + "ffn.lin1."),
            ("encoder.layer.{i}.output.dense.", _LAYER + "ffn.lin2."),
            ("encoder.layer.{i}.output.LayerNorm.", _LAYER + "output_layer_norm."),
            ("cls.predictions.transform.dense.", "vocab_transform."),
            ("cls.predictions.transform.LayerNorm.", "vocab_layer_norm."),
            ("cls.predictions.bias", "vocab_projector.bias"),
        ),
        also=(),
        unused=frozenset({"embeddings.position_ids", "vocab_projector.weight"}),
        head="vocab_transform.",
        pooler=False,
        read=_read_distilbert,
        write=_write_distilbert,
    ),
}
ARCHITECTURES = {a: t for t, layout in LAYOUTS.items() for a in layout.architectures}


def check_config(c) -> None:
    """The BERTConfig settings each layout can hold (called by BERTConfig itself, so no model is built that its
    save_pretrained could not write)."""
    kind, wanted = c.hf_model_type, {"bert": 0, "roberta": c.pad_token_id + 1, "distilbert": 0}
    if kind not in wanted:
        raise TinygraftError(f"hf_model_type must be 'bert', 'roberta' or 'distilbert', got {kind!r}")
    if c.position_offset != wanted[kind]:
        how = "from pad_token_id + 1" if kind == "roberta" else "from 0"
        raise TinygraftError(f"a {kind} model numbers positions {how}: it needs position_offset={wanted[kind]}")
    if kind == "distilbert" and (c.type_vocab_size, c.layer_norm_eps) != (0, 1e-12):
        raise TinygraftError("a distilbert model has no token types and LayerNorm eps 1e-12 (type_vocab_size=0)")
    if kind != "distilbert" and c.type_vocab_size == 0:
        raise TinygraftError(f"a {kind} model reads token types: type_vocab_size must be at least 1")
    if kind == "roberta" and c.hidden_act != "gelu":
        raise TinygraftError("a roberta model's masked-LM head applies the erf GELU: it needs hidden_act='gelu'")


def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)"))


def _translate(name: str, pairs) -> str | None:
    """`name` with the first matching source prefix of (source, destination) `pairs` replaced, or None."""
    for src, dst in pairs:
        m = _pattern(src).match(name)
        if m:
            return (dst.replace("{i}", m.group(1)) if m.groups() else dst) + name[m.end() :]
    return None


def from_hf_name(name: str, target: str, model_type: str) -> str | None:
    """Our state_dict name for a tensor of a RoBERTa / DistilBERT file (target "bert" or "mlm", as for BERT), or None
    for one we accept and do not use (buffers, the tied decoder, a pooler under a masked LM, task heads)."""
    layout = LAYOUTS[model_type]
    name = name.removeprefix(layout.prefix)
    if name in layout.unused:
        return None
    ours = _translate(name, [(theirs, ours) for ours, theirs in layout.names + layout.also])
    head, pooler = ours is not None and ours.startswith("cls."), ours is not None and ours.startswith("pooler.")
    if ours is None or (head and target != "mlm") or (pooler and target == "mlm"):
        return None
    return ours if target == "bert" or ours.startswith("cls.") else "bert." + ours


def hf_heads(names, model_type: str) -> dict[str, bool]:
    layout = LAYOUTS[model_type]
    names = list(names)
    return {
        "pooler": layout.pooler and any(n.removeprefix(layout.prefix).startswith("pooler.") for n in names),
        "mlm": any(n.startswith(layout.head) for n in names),
    }


def to_hf_names(tensors: dict, model_type: str, mlm: bool) -> dict:
    """Our tensors (a BERT's, or a BERTForMaskedLM's with `bert.` names) under the layout's file names."""
    layout, out = LAYOUTS[model_type], {}
    for name, t in tensors.items():
        local = name.removeprefix("bert.") if mlm else name
        theirs = _translate(local, layout.names)
        if theirs is None:
            raise TinygraftError(f"the {layout.name} layout has no place for tensor {name!r}, so it cannot be saved")
        out[(layout.prefix if mlm and not local.startswith("cls.") else "") + theirs] = t
    return out


def config_to_hf(c, mlm: bool, dtype: str) -> dict:
    layout = LAYOUTS[c.hf_model_type]
    return {
        "architectures": [layout.architectures[1 if mlm else 0]],
        "model_type": layout.model_type,
        **layout.write(c),
        "dtype": dtype,
    }
