"""The Hugging Face checkpoint layout, in and out: `config.json` + `model.safetensors` [+ tokenizer files].

Names map one to one (our modules are named as in `GPT2LMHeadModel` / `BertModel` / `BertForMaskedLM`), with these
differences, all handled here:

    GPT-2   HF's Conv1D stores `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` weights as (in, out): we
            transpose to nn.Linear's (out, in). `transformer.` is optional (GPT2Model files lack it). The causal-mask
            buffers `attn.bias` / `attn.masked_bias` of old files are not weights. `lm_head.weight` is `wte`.
    BERT    `bert.` is optional (BertModel files lack it); the pooler and the MLM head (`cls.predictions.*`) may
            each be absent. `cls.predictions.decoder.weight` is the word embedding and `.decoder.bias` is
            `cls.predictions.bias`. `embeddings.position_ids`, `cls.seq_relationship.*` (next-sentence head) and
            other task heads are accepted and unused. TF-converted files say LayerNorm `gamma`/`beta`.

Config keys are strict where they change the architecture (`position_embedding_type` other than absolute,
`is_decoder`, `add_cross_attention`, an activation we lack, untied embeddings, ...: an error naming the key) and
tolerant of everything else (`_name_or_path`, `transformers_version`, `dtype`, `use_cache`, dropout of task heads,
generation settings): such keys, and tensors we do not use, are recorded in a `LoadReport` for `tinygraft info`.
The config mapping is in models/hf_config.py (re-exported here).
"""

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tinygraft.core.layers import init_weights
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTConfig, BERTForMaskedLM
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.hf_config import CONFIG, config_from_hf, config_to_hf, family_of, read_config  # noqa: F401

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


@dataclass
class LoadReport:
    """What a load accepted without using, and which heads were absent or freshly made (for `tinygraft info`)."""

    path: str
    family: str  # "gpt" | "bert"
    architectures: list[str]
    unused_config: dict = field(default_factory=dict)  # key -> value accepted but not read
    unused_tensors: list[str] = field(default_factory=list)  # file names of tensors not loaded (buffers, heads)
    missing_heads: list[str] = field(default_factory=list)  # heads the file lacks: "pooler", "masked-LM head"
    new_heads: list[str] = field(default_factory=list)  # heads initialised fresh because the caller asked

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- model.safetensors
def weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a directory (one file, or the shards an index names)."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise TinygraftError(f"'{path / WEIGHTS_INDEX}' is not a valid safetensors index") from None
        for s in shards:
            if not (path / s).is_file():
                raise TinygraftError(f"'{path}' lacks the weights shard {s!r} that {WEIGHTS_INDEX} names")
        return [path / s for s in shards]
    pickled = [p for p in PICKLED if (path / p).is_file()]
    if pickled:
        raise TinygraftError(
            f"'{path}' holds weights only as {pickled[0]}, which tinygraft does not read (no "
            "pickle); convert them to model.safetensors"
        )
    raise TinygraftError(f"'{path}' holds no model weights (no {WEIGHTS})")


class _Weights:
    """Lazy view of a directory's tensors: shapes from the headers, data read only when asked for."""

    def __init__(self, path: Path):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in weight_files(path):
            with self._open(file) as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    self.files[name], self.shapes[name], self.dtypes[name] = file, tuple(s.get_shape()), s.get_dtype()

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise TinygraftError(f"weights file '{file}' is truncated or corrupt ({e})") from None

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for file in sorted({self.files[n] for n in names}):
            with self._open(file) as f:
                for n in names:
                    if self.files[n] == file:
                        try:
                            out[n] = f.get_tensor(n)
                        except (SafetensorError, OSError) as e:
                            raise TinygraftError(f"weights file '{file}' is truncated or corrupt ({e})") from None
        return out


def _classify(name: str, fam: str, target: str) -> tuple[str, str | None]:
    """Map a file tensor name to ('load', our name) | ('unused', None) | ('foreign', None).

    `target` is "gpt", "bert" (BERT backbone) or "mlm" (BERTForMaskedLM). 'foreign' marks a name in the backbone's
    namespace that a model with this config does not have: a sign the config and the weights disagree.
    """
    if fam == "gpt":
        name = name.removeprefix("transformer.")
        if re.search(r"(^|\.)attn\.(bias|masked_bias)$", name) or name == "lm_head.weight":
            return "unused", None  # causal-mask buffers; the LM head is the tied wte
        if name.split(".")[0] in ("wte", "wpe", "h", "ln_f"):
            return "load", "transformer." + name
        return "unused", None  # other heads (score.*, multiple_choice_head.*)
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
    name = name.removeprefix("bert.")
    top = name.split(".")[0]
    if name in ("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight"):
        return "unused", None  # buffers; the decoder is the tied word embedding
    if top in ("embeddings", "encoder", "pooler"):
        if top == "pooler" and target == "mlm":
            return "unused", None  # BertForMaskedLM has no pooler
        return "load", name if target == "bert" else "bert." + name
    if name.startswith("cls.predictions.") and target == "mlm":
        return "load", "cls.predictions.bias" if name == "cls.predictions.decoder.bias" else name
    return "unused", None  # cls.* for a plain BERT, cls.seq_relationship.*, classifier.*, qa_outputs.*


def _hf_shape(our_name: str, shape: torch.Size) -> tuple[int, ...]:
    return tuple(reversed(shape)) if CONV1D.search(our_name) else tuple(shape)


def _own_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied aliases (lm_head.weight, cls.predictions.decoder.weight)."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------- loading
def inspect_dir(path: str | Path, target: str | None = None):
    """Read config and weight headers (no tensor data). Returns (cfg, report, plan, weights, heads).

    plan: {our name: file name} of the tensors to load; heads: {"pooler": bool, "mlm": bool} present in the file.
    `target` None picks "gpt", or "mlm" when a BERT file has a masked-LM head, else "bert".
    """
    path = Path(path)
    raw = read_config(path)
    where = f"config.json in '{path}'"
    cfg, unused_config = config_from_hf(raw, where)
    fam = "gpt" if isinstance(cfg, GPTConfig) else "bert"
    weights = _Weights(path)
    names = list(weights.shapes)
    heads = {
        "pooler": any(n.removeprefix("bert.").startswith("pooler.") for n in names),
        "mlm": any(n.startswith("cls.predictions.transform.") for n in names),
    }
    if target is None:
        target = "gpt" if fam == "gpt" else ("mlm" if heads["mlm"] else "bert")
    if (target == "gpt") != (fam == "gpt"):
        want = "GPT-2" if target == "gpt" else "BERT"
        raise TinygraftError(f"{where} describes a {raw.get('model_type', fam)!r} model, not a {want} model")
    report = LoadReport(str(path), fam, list(raw.get("architectures") or []), unused_config)
    plan: dict[str, str] = {}
    for name in names:
        kind, ours = _classify(name, fam, target)
        if kind == "unused" or ours in plan:  # a second copy (decoder.bias beside predictions.bias) stays unused
            report.unused_tensors.append(name)
        else:
            plan[ours] = name
    return cfg, report, plan, weights, heads


def load_pretrained_model(
    path: str | Path, target: str | None = None, new_head: bool = False, dtype: torch.dtype | None = None
) -> tuple[nn.Module, LoadReport]:
    """Build GPT / BERT / BERTForMaskedLM from a Hugging Face directory; returns (model, report).

    A head the file lacks (BERT's pooler, the masked-LM head) is an error for BERTForMaskedLM and an absence for
    BERT, unless `new_head=True`, which initialises it fresh (listed in `report.new_heads`).
    """
    cfg, report, plan, weights, heads = inspect_dir(path, target)
    target = target or ("gpt" if report.family == "gpt" else ("mlm" if heads["mlm"] else "bert"))
    if target == "mlm" and not heads["mlm"]:
        if not new_head:
            raise TinygraftError(
                f"'{path}' has no masked-LM head (cls.predictions.*); ask for a new head "
                "(new_head=True) to initialise one"
            )
        report.missing_heads.append("masked-LM head")
        report.new_heads.append("masked-LM head")
    if target == "bert" and not heads["pooler"]:
        report.missing_heads.append("pooler")
        if new_head:
            report.new_heads.append("pooler")
    with torch.device("cpu"):
        if target == "gpt":
            model = GPT(cfg)
        elif target == "mlm":
            model = BERTForMaskedLM(cfg)
        else:
            model = BERT(cfg, add_pooler=heads["pooler"] or new_head)
    own = _own_tensors(model)
    fresh = ("cls.",) if "masked-LM head" in report.new_heads else ("pooler.",) if report.new_heads else ()
    foreign = [f for ours, f in plan.items() if ours not in own]
    if foreign:
        raise TinygraftError(
            f"'{path}' holds tensor {foreign[0]!r}, which a model with its config.json does not "
            f"have ({len(foreign)} such tensors); the config and the weights disagree"
        )
    missing = [n for n in own if n not in plan and not n.startswith(fresh)]
    if missing:
        raise TinygraftError(f"'{path}' lacks the tensor for {missing[0]!r} ({len(missing)} missing in all)")
    for ours, name in plan.items():
        if _hf_shape(ours, own[ours].shape) != weights.shapes[name]:
            raise TinygraftError(
                f"tensor {name!r} in '{path}' has shape {list(weights.shapes[name])} but its "
                f"config.json implies {list(_hf_shape(ours, own[ours].shape))}"
            )
    tensors = weights.load(list(plan.values()))
    with torch.no_grad():
        for ours, name in plan.items():
            t = tensors[name]
            own[ours].copy_(t.t() if CONV1D.search(ours) else t)
    if "masked-LM head" in report.new_heads:
        model.cls.apply(init_weights)  # the decoder is tied: re-initialising it would touch the embeddings
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), report


# ---------------------------------------------------------------------------------------------------- saving
def state_dict_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our tensors under Hugging Face names: tied copies dropped, Conv1D weights transposed."""
    if not isinstance(model, GPT | BERT | BERTForMaskedLM):
        raise TinygraftError(f"a {type(model).__name__} has no Hugging Face layout; export a GPT or a BERT")
    out = {}
    for name, t in _own_tensors(model).items():
        t = t.detach()
        out[name] = (t.t() if CONV1D.search(name) else t).contiguous().cpu()
    expected = {n for n in model.state_dict()}
    if set(out) - expected:
        raise TinygraftError(f"the model has tensor {sorted(set(out) - expected)[0]!r}, which the layout cannot hold")
    return out


def tokenizer_files(tokenizer, max_length: int) -> dict[str, str]:
    """tokenizer.json (+ vocab.txt for WordPiece) and the small configs transformers' AutoTokenizer reads."""
    special = {}
    for role in ("unk", "cls", "sep", "pad", "mask", "eos"):
        i = getattr(tokenizer, f"{role}_id", None)
        if i is not None:
            special[f"{role}_token"] = tokenizer.id_to_token(i)
    if "eos_token" in special and tokenizer.kind == "bpe":
        special["bos_token"] = special["eos_token"]
    inputs = ["input_ids", "attention_mask"]
    if tokenizer.cls_id is not None and tokenizer.sep_id is not None:
        inputs.insert(1, "token_type_ids")  # BERT templates: sentence pairs carry segment ids
    files = {
        "tokenizer.json": tokenizer.to_json(),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": max_length,
                **special,
                "model_input_names": inputs,
            },
            indent=2,
        ),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    if tokenizer.kind == "wordpiece":
        files["vocab.txt"] = "".join(tokenizer.id_to_token(i) + "\n" for i in range(tokenizer.vocab_size))
    return files


def save_pretrained_model(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) so `transformers` loads the directory unchanged.

    Everything is written into a temporary sibling directory and fsynced first; a new directory is then renamed
    into place whole, an existing one gets each file replaced atomically (other files in it are left alone).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TinygraftError(f"save path '{path}' is a file, not a directory")
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config, where=f"the tokenizer given for '{path}'")
    eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    config = config_to_hf(model, eos)
    tensors = state_dict_to_hf(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    texts = {CONFIG: json.dumps(config, indent=2) + "\n"}
    if tokenizer is not None:
        positions = getattr(model.config, "block_size", None) or model.config.max_position_embeddings
        texts.update(tokenizer_files(tokenizer, positions))
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    for name, text in texts.items():
        (tmp / name).write_text(text, encoding="utf-8")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if not path.exists():
        os.replace(tmp, path)
    else:
        for file in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG):  # config.json last
            os.replace(file, path / file.name)
        tmp.rmdir()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


# -------------------------------------------------------------------------------------------------- tokenizers
def check_tokenizer(tokenizer, config: GPTConfig | BERTConfig, where: str, eos_token_id: int | None = None) -> None:
    """A tokenizer belongs to a checkpoint when every id it makes has an embedding row and the pad / end-of-text
    ids agree with the config's; otherwise one sentence says how they differ."""
    rows = config.vocab_size
    if tokenizer.vocab_size > rows:
        raise TinygraftError(
            f"{where} has {tokenizer.vocab_size} tokens but the model's embedding has only {rows} "
            "rows, so the tokenizer does not belong to this checkpoint"
        )
    if isinstance(config, BERTConfig) and tokenizer.pad_id is not None and tokenizer.pad_id != config.pad_token_id:
        raise TinygraftError(
            f"{where} pads with id {tokenizer.pad_id} but the checkpoint's pad_token_id is "
            f"{config.pad_token_id}, so the tokenizer does not belong to this checkpoint"
        )
    if eos_token_id is not None and tokenizer.eos_id != eos_token_id:
        raise TinygraftError(
            f"{where} ends text with id {tokenizer.eos_id} but the checkpoint's eos_token_id is "
            f"{eos_token_id}, so the tokenizer does not belong to this checkpoint"
        )


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()


def load_tokenizer(path: str | Path, config: GPTConfig | BERTConfig | None = None):
    """The TextTokenizer beside a checkpoint, checked against its config."""
    from tinygraft.data.tokenizer import TextTokenizer

    path = Path(path)
    tok = TextTokenizer.load(path)
    raw = read_config(path)
    if config is None:
        config, _ = config_from_hf(raw, f"config.json in '{path}'")
    eos = (
        raw.get("eos_token_id") if isinstance(config, GPTConfig) and isinstance(raw.get("eos_token_id"), int) else None
    )
    check_tokenizer(tok, config, f"the tokenizer in '{path}'", eos)
    return tok


# ------------------------------------------------------------------------------------------------------ info
def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json naming a model_type or architectures (a run's config does not)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    try:
        raw = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and ("model_type" in raw or "architectures" in raw)


def describe_checkpoint(path: str | Path) -> dict:
    """What `tinygraft info` prints for a pretrained directory; reads only config.json and the weight headers."""
    cfg, report, plan, weights, heads = inspect_dir(path)
    params = sum(torch.Size(weights.shapes[f]).numel() for f in plan.values())
    dtypes = sorted({weights.dtypes[f] for f in plan.values()})
    info = {
        "format": "huggingface",
        "path": str(path),
        "family": report.family,
        "architectures": report.architectures,
        "config": asdict(cfg),
        "params": params,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "heads": {"pooler": heads["pooler"], "masked_lm": heads["mlm"]} if report.family == "bert" else {"lm": True},
        "unused_config": report.unused_config,
        "unused_tensors": report.unused_tensors,
        "tokenizer": None,
        "pooling": None,
    }
    if (Path(path) / "modules.json").is_file() or (Path(path) / "1_Pooling").is_dir():
        from tinygraft.models.pretrained import read_pooling  # pretrained.py imports this module

        info["pooling"] = asdict(read_pooling(path))
    if has_tokenizer(path):
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
