"""Sentence pooling: (B, T, C) token states -> (B, C), one function and one set of names for heads and embeddings.

    cls            the first token's state ([CLS] in BERT)
    mean           the mean over real tokens (the attention mask), as sentence-transformers
    max            the maximum over real tokens
    mean_sqrt_len  the sum over real tokens divided by sqrt(their count) (sentence-transformers' mean_sqrt_len_tokens)
    last           the last real token: the one a causal GPT has read the whole sequence at
    pooler         BERT's tanh dense over [CLS] (`transformers`' default classification head); needs the pooled output

A checkpoint may ship a sentence-transformers pooling config (`modules.json` naming a Pooling module, whose
`config.json` turns modes on; all-MiniLM-L6-v2: mean, then L2-normalise): `read_pooling` reads it into our names.
Its BERT pooler was never trained, so such a checkpoint should be fine-tuned and embedded with its own pooling
(issue 9: a pooler head on MiniLM probes to 0.509 on SST-2, mean pooling to 0.792); `default_pooling` decides.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT

POOLINGS = ("cls", "mean", "max", "mean_sqrt_len", "last", "pooler")
# sentence-transformers' mode names (config key pooling_mode_<name>), in the order it concatenates them
ST_MODES = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
            "lasttoken": "last"}  # fmt: skip
ST_NAMED = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}  # newer configs: "pooling_mode": name


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, C) states, (B, T) mask (1 = real token) -> (B, C) by `how` (see the module docstring)."""
    if how == "cls":
        return hidden[:, 0]
    if how in ("mean", "mean_sqrt_len"):
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        n = m.sum(1).clamp(min=1e-9)  # (B, 1) real tokens per sequence
        return (hidden * m).sum(1) / (n if how == "mean" else n.sqrt())
    if how == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).max(dim=1).values
    if how == "last":
        T = mask.shape[1]
        # index of the last real token; works for any padding side (argmax returns the first maximum)
        last = (mask.bool() * torch.arange(1, T + 1, device=mask.device)).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "pooler":
        if pooled is None:
            raise TinygraftError("pooling 'pooler' needs a BERT with a pooler layer; use 'cls' or 'mean'")
        return pooled
    raise TinygraftError(f"unknown pooling {how!r} (known: {', '.join(POOLINGS)})")


def check_pooling(how: str) -> str:
    if how not in POOLINGS:
        raise TinygraftError(f"unknown pooling {how!r} (known: {', '.join(POOLINGS)})")
    return how


# ------------------------------------------------------------------------------------ sentence-transformers' config
@dataclass
class Pooling:
    """How a checkpoint turns token states into one sentence vector."""

    modes: list[str] = field(default_factory=lambda: ["mean"])  # several modes concatenate, in ST_MODES order
    normalize: bool = False  # the checkpoint's modules.json lists a Normalize module
    max_seq_length: int | None = None  # sentence_bert_config.json (256 for MiniLM); None: the model's positions


def _read(path: Path, default):
    """A sentence-transformers file, or `default` when the directory has none."""
    if not path.is_file():
        return default
    return read_json(path, "sentence-transformers file", list if isinstance(default, list) else dict)


def ships_pooling(path: str | Path) -> bool:
    path = Path(path)
    return (path / "modules.json").is_file() or (path / "1_Pooling" / "config.json").is_file()


def modes_of(conf: dict, where: str) -> list[str]:
    """Our names for the modes a sentence-transformers Pooling config turns on."""
    if isinstance(conf.get("pooling_mode"), str):
        if conf["pooling_mode"] not in ST_NAMED:
            raise TinygraftError(f"{where} asks for {conf['pooling_mode']} pooling, which tinygraft does not implement")
        return [ST_NAMED[conf["pooling_mode"]]]
    on = [k.removeprefix("pooling_mode_") for k, v in conf.items() if k.startswith("pooling_mode_") and v]
    unknown = [m for m in on if m not in ST_MODES]
    if unknown:
        raise TinygraftError(
            f"{where} asks for {unknown[0]} pooling, which tinygraft does not implement (known: {', '.join(ST_MODES)})"
        )
    if not on:
        raise TinygraftError(f"{where} switches every pooling mode off")
    return [ST_MODES[m] for m in ST_MODES if m in on]


def read_pooling(path: str | Path) -> Pooling:
    """The checkpoint's own pooling (modules.json -> the Pooling module's config.json), mean when it has none."""
    path = Path(path)
    pooling = Pooling()
    modules = _read(path / "modules.json", default=[])
    pool_dir = path / "1_Pooling"
    for m in modules if isinstance(modules, list) else []:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            pool_dir = path / m.get("path", "1_Pooling")
        elif kind.endswith("Normalize"):
            pooling.normalize = True
    conf = _read(pool_dir / "config.json", default=None)
    if conf is not None:
        pooling.modes = modes_of(conf, f"'{pool_dir / 'config.json'}'")
    st = _read(path / "sentence_bert_config.json", default={})
    if isinstance(st, dict) and isinstance(st.get("max_seq_length"), int):
        pooling.max_seq_length = st["max_seq_length"]
    return pooling


def head_pooling(pooling: Pooling | None) -> str | None:
    """The one mode a task head can pool with, from a checkpoint's pooling (None: it ships none)."""
    if pooling is None:
        return None
    if len(pooling.modes) != 1 or pooling.modes[0] == "mean_sqrt_len":
        raise TinygraftError(f"the checkpoint pools with {'+'.join(pooling.modes)}, which no task head implements")
    return pooling.modes[0]


def default_pooling(backbone: nn.Module, shipped: str | None = None) -> str:
    """The pooling a sequence or similarity head uses unless the user names one: the checkpoint's own when it ships
    one; else `last` for a GPT (a causal model has read the whole text only at its last token), `pooler` for a
    BERT with a pooler (`transformers`' default), `cls` for a pooler-less BERT (one we pre-trained with the MLM
    head)."""
    if shipped is not None:
        return shipped
    if isinstance(backbone, BERTForMaskedLM):
        backbone = backbone.bert
    if isinstance(backbone, GPT):
        return "last"
    return "pooler" if backbone.pooler is not None else "cls"


# ---------------------------------------------------------------------------------------------------- embeddings
def token_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor):
    """((B, T, C) final hidden states, BERT's pooled output or None) of a BERT, a BERTForMaskedLM's encoder, or a
    GPT (right padding only: under causal attention a real token never sees the pads after it)."""
    if isinstance(model, BERTForMaskedLM):
        model = model.bert
    if isinstance(model, BERT):
        out = model(ids, mask, types)
        return out.last_hidden_state, out.pooled if model.pooler is not None else None
    if isinstance(model, GPT):
        return model.hidden_states(ids), None
    raise TinygraftError(f"cannot embed sentences with a {type(model).__name__}; use a BERT or a GPT")


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    pooling: Pooling | None = None,
    normalize: bool | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, C * modes) float32 sentence vectors: tokenized with the model's template, pooled (several modes
    concatenated, as sentence-transformers does), optionally L2-normalised (`normalize` None follows the checkpoint).
    Texts are cut at `pooling.max_seq_length`."""
    pooling = pooling or Pooling()
    normalize = pooling.normalize if normalize is None else normalize
    positions = getattr(model.config, "max_position_embeddings", None) or model.config.block_size
    max_len = min(pooling.max_seq_length or positions, positions)
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer.encode_for_model(t, max_length=max_len) for t in texts[start : start + batch_size]]
        T = max(1, max(len(ids) for ids, _ in encoded))
        ids = torch.full((len(encoded), T), pad, dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for i, (e_ids, e_types) in enumerate(encoded):
            ids[i, : len(e_ids)] = torch.tensor(e_ids, dtype=torch.long)
            types[i, : len(e_types)] = torch.tensor(e_types, dtype=torch.long)
            mask[i, : len(e_ids)] = 1
        ids, types, mask = ids.to(device), types.to(device), mask.to(device)
        hidden, pooled = token_states(model, ids, mask, types)
        vec = torch.cat([pool(hidden.float(), mask, m, pooled) for m in pooling.modes], dim=-1)
        out.append(F.normalize(vec, dim=-1) if normalize else vec)
    model.train(was_training)
    width = model.config.n_embd * len(pooling.modes)
    return torch.cat(out).cpu() if out else torch.zeros(0, width)
