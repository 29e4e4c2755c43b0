"""The Hugging Face directory layout, whatever the model: `config.json` + `model.safetensors` [+ tokenizer files].

This file knows the files, not the models. Each model file maps its own names (models/gpt.py for GPT-2's, with its
transposed Conv1D weights; models/bert.py for BERT's, with its optional prefix, heads and TF-era names), as nanoGPT
keeps GPT-2's mapping beside the model; models/pretrained.py picks the model a directory holds. What is here:

    reading   read_config, ConfigKeys (strict about the keys a model reads, the rest reported as unused),
              weight_files (one file or an index of shards), LazyWeights (headers first, data on demand),
              load_weights (every tensor placed, shapes checked, the unused ones listed in a LoadReport), a file
              at a time and a tensor at a time, so a sharded checkpoint never sits in memory beside the model
    writing   save_dir: everything into a temporary sibling directory, fsynced, then renamed into place whole;
              shards of at most max_shard_size bytes (parse_size) with the index transformers reads
    tokenizer tokenizer_files (tokenizer.json + the small configs AutoTokenizer reads), load_tokenizer, which checks
              that the tokenizer belongs to the checkpoint (every id has an embedding row, pad / eos ids agree)

Pickled weights (`pytorch_model.bin`, ...) are never read: they are named and refused.
"""

import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tinygraft.core.jsonfile import read_json
from tinygraft.core.layers import ACTIVATIONS
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"  # transformers' names (huggingface_hub's split_state_dict_into_shards)
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# transformers' save_pretrained default (50GB since v5; 5GB before): below it a model stays one model.safetensors.
MAX_SHARD_SIZE = "50GB"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
KNOWN_MODEL_TYPES = "'gpt2', 'bert', 'roberta' and 'distilbert'"  # for messages: the model types tinygraft reads
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
# Settings every supported config must have at these values (PretrainedConfig defaults): others change the model.
FIXED = {
    "is_decoder": (False, "a BERT decoder with causal attention"),
    "add_cross_attention": (False, "cross-attention layers"),
    "is_encoder_decoder": (False, "an encoder-decoder model"),
    "tie_word_embeddings": (True, "an output layer untied from the word embeddings"),
    "pruned_heads": ({}, "pruned attention heads"),
}


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


# --------------------------------------------------------------------------------------------------- config.json
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


def check_model_type(raw: dict, where: str, model_type: str, architectures: tuple[str, ...], name: str) -> None:
    """Refuse a config of another model (`name` is how the error calls the wanted one: "GPT-2", "BERT")."""
    given = raw.get("model_type")
    if given is None:
        if not set(raw.get("architectures") or []) & set(architectures):
            raise TinygraftError(f"{where} names no model_type; tinygraft reads {KNOWN_MODEL_TYPES} checkpoints")
    elif given != model_type:
        raise TinygraftError(f"{where} describes a {given!r} model, not a {name} model")


class ConfigKeys:
    """Reads a config dict, remembering which keys were used; the rest is reported as accepted but unused."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where, self.used = raw, where, {"model_type", "architectures"}
        for key, (wanted, meaning) in FIXED.items():
            self.require(key, wanted, meaning)

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


# ---------------------------------------------------------------------------------------------- model.safetensors
def weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a directory (one file, or the shards an index names)."""
    path = Path(path)
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
            f"'{path}' holds weights only as {pickled[0]}, which tinygraft does not read (no pickle); convert them to "
            "model.safetensors"
        )
    raise TinygraftError(f"'{path}' holds no model weights (no {WEIGHTS})")


class LazyWeights:
    """A directory's tensors: names, shapes and dtypes from the headers, data read only when asked for."""

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
        return dict(self.each(names))

    def each(self, names: list[str]):
        """(name, tensor) of `names`, a file at a time, each tensor read only when the one before is taken: a caller
        that drops each before asking for the next holds one tensor beyond its own at a time."""
        for file in sorted({self.files[n] for n in names}):
            with self._open(file) as f:
                for n in names:
                    if self.files[n] == file:
                        try:
                            t = f.get_tensor(n)
                        except (SafetensorError, OSError) as e:
                            raise TinygraftError(f"weights file '{file}' is truncated or corrupt ({e})") from None
                        yield n, t
                        del t  # not kept alive while the next one is read


def own_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied aliases (lm_head.weight, cls.predictions.decoder.weight): each tensor once."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def plan(names, rename: Callable[[str], str | None]) -> tuple[dict[str, str], list[str]]:
    """({our name: file name} of the tensors to load, [file names not used]); a second copy of one tensor is unused."""
    chosen, unused = {}, []
    for name in names:
        ours = rename(name)
        if ours is None or ours in chosen:
            unused.append(name)
        else:
            chosen[ours] = name
    return chosen, unused


def load_weights(
    model: nn.Module,
    path: str | Path,
    report: LoadReport,
    rename: Callable[[str], str | None],
    transposed: Callable[[str], bool] = lambda name: False,
    fresh: tuple[str, ...] = (),
) -> nn.Module:
    """Copy a directory's tensors into `model`: `rename` maps a file name to ours (None: accepted, unused),
    `transposed` names our tensors stored transposed, `fresh` the prefixes of heads initialised here instead."""
    weights = LazyWeights(Path(path))
    chosen, report.unused_tensors = plan(weights.shapes, rename)
    own = own_tensors(model)
    foreign = [f for ours, f in chosen.items() if ours not in own]
    if foreign:
        raise TinygraftError(
            f"'{path}' holds tensor {foreign[0]!r}, which a model with its config.json does not have ({len(foreign)} "
            "such tensors); the config and the weights disagree"
        )
    missing = [n for n in own if n not in chosen and not n.startswith(fresh)]
    if missing:
        raise TinygraftError(f"'{path}' lacks the tensor for {missing[0]!r} ({len(missing)} missing in all)")
    for ours, name in chosen.items():
        shape = tuple(reversed(own[ours].shape)) if transposed(ours) else tuple(own[ours].shape)
        if shape != weights.shapes[name]:
            raise TinygraftError(
                f"tensor {name!r} in '{path}' has shape {list(weights.shapes[name])} but its config.json implies "
                f"{list(shape)}"
            )
    ours_of = {name: ours for ours, name in chosen.items()}
    with torch.no_grad():
        for name, t in weights.each(list(chosen.values())):
            ours = ours_of[name]
            own[ours].copy_(t.t() if transposed(ours) else t)
            del t  # a multi-GB checkpoint must not sit in memory beside the model it fills
    return model


# ------------------------------------------------------------------------------------------------------- writing
def parse_size(size: int | str, what: str = "--max-shard-size") -> int:
    """Bytes of a size as transformers' max_shard_size takes it: an int, or a number and a unit, KB, MB, GB, TB in
    powers of 1000 and KiB, MiB, GiB, TiB in powers of 1024 (5GB, 500MB, 1.5GiB, 200000)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).upper() not in SIZE_UNITS:
            raise TinygraftError(
                f"{what} {str(size)!r} is not a size; write bytes (200000) or a number and a unit: 200KB, 500MB, "
                "5GB (powers of 1000) or 2GiB (powers of 1024)"
            )
        n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise TinygraftError(f"{what} {str(size)!r} is not a size above 0 bytes")
    return n


def split_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order into shards of at most `limit` bytes, as huggingface_hub's split_state_dict_into_shards
    does (a tensor larger than the limit gets a shard of its own), so our files match what transformers writes."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if n > limit:
            shards.append({name: t})
            continue
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + n
    if current or not shards:
        shards.append(current)
    return shards


def is_weights_file(name: str) -> bool:
    return name in (WEIGHTS, WEIGHTS_INDEX) or SHARD_NAME.fullmatch(name) is not None


def save_dir(
    path: str | Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    tokenizer=None,
    positions=None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) so `transformers` loads the directory unchanged;
    weights over `max_shard_size` (default MAX_SHARD_SIZE) go into shards + model.safetensors.index.json.

    Everything is written into a temporary sibling directory and fsynced first; a new directory is then renamed
    into place whole, an existing one gets each file replaced atomically (other files in it are left alone, except
    weights files of an earlier save that this one does not write: a loader would read them instead).
    """
    path = Path(path)
    limit = parse_size(MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    if path.exists() and not path.is_dir():
        raise TinygraftError(f"save path '{path}' is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, config, tensors, tokenizer, positions, limit)
    except BaseException:  # a full disk or Ctrl-C: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
    else:
        stale = [f for f in path.iterdir() if is_weights_file(f.name) and f.is_file() and not (tmp / f.name).exists()]
        for file in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG):  # config.json last
            if file.name == CONFIG:
                for old in stale:
                    old.unlink()
            os.replace(file, path / file.name)
        tmp.rmdir()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _write_files(tmp: Path, config: dict, tensors: dict, tokenizer, positions, limit: int) -> None:
    texts = {CONFIG: json.dumps(config, indent=2) + "\n"}
    if tokenizer is not None:
        texts.update(tokenizer_files(tokenizer, positions))
    shards = split_shards(tensors, limit)
    names = [WEIGHTS] if len(shards) == 1 else [SHARD.format(i + 1, len(shards)) for i in range(len(shards))]
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {n: file for file, shard in zip(names, shards, strict=True) for n in shard},
        }
        texts[WEIGHTS_INDEX] = json.dumps(index, indent=2, sort_keys=True) + "\n"
    for name, text in texts.items():
        (tmp / name).write_text(text, encoding="utf-8")
    for file, shard in zip(names, shards, strict=True):
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        # safetensors creates its file owner-only (0600); give it the mode the umask gives the files beside it
        os.chmod(tmp / file, stat.S_IMODE((tmp / CONFIG).stat().st_mode))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


# -------------------------------------------------------------------------------------------------- tokenizers
def tokenizer_files(tokenizer, max_length: int) -> dict[str, str]:
    """tokenizer.json (+ vocab.txt for WordPiece) and the small configs transformers' AutoTokenizer reads."""
    special = {}
    for role in ("unk", "cls", "sep", "pad", "mask", "eos"):
        i = getattr(tokenizer, f"{role}_id", None)
        if i is not None:
            special[f"{role}_token"] = tokenizer.id_to_token(i)
    if "eos_token" in special and tokenizer.kind == "bpe":  # GPT-2's <|endoftext|>, RoBERTa's <s> (its cls)
        special["bos_token"] = special.get("cls_token", special["eos_token"])
    inputs = ["input_ids", "attention_mask"]
    if tokenizer.cls_id is not None and tokenizer.sep_id is not None and tokenizer.pair_type:
        inputs.insert(1, "token_type_ids")  # BERT templates: sentence pairs carry segment ids (RoBERTa's do not)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        **special,
        "model_input_names": inputs,
    }
    files = {
        "tokenizer.json": tokenizer.to_json(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    if tokenizer.kind == "wordpiece":
        files["vocab.txt"] = "".join(tokenizer.id_to_token(i) + "\n" for i in range(tokenizer.vocab_size))
    return files


def check_tokenizer(tokenizer, vocab_size: int, where: str, pad_id: int | None = None, eos_id: int | None = None):
    """A tokenizer belongs to a checkpoint when every id it makes has an embedding row and the pad / end-of-text
    ids agree with the config's (None: the config names none); otherwise one sentence says how they differ."""
    if tokenizer.vocab_size > vocab_size:
        raise TinygraftError(
            f"{where} has {tokenizer.vocab_size} tokens but the model's embedding has only {vocab_size} rows, so the "
            "tokenizer does not belong to this checkpoint"
        )
    if pad_id is not None and tokenizer.pad_id is not None and tokenizer.pad_id != pad_id:
        raise TinygraftError(
            f"{where} pads with id {tokenizer.pad_id} but the checkpoint's pad_token_id is {pad_id}, so the "
            "tokenizer does not belong to this checkpoint"
        )
    if eos_id is not None and tokenizer.eos_id != eos_id:
        raise TinygraftError(
            f"{where} ends text with id {tokenizer.eos_id} but the checkpoint's eos_token_id is {eos_id}, so the "
            "tokenizer does not belong to this checkpoint"
        )


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()


def load_tokenizer(path: str | Path, vocab_size: int, pad_id: int | None = None, eos_id: int | None = None):
    """The TextTokenizer beside a checkpoint, checked against its config (see check_tokenizer)."""
    tok = TextTokenizer.load(Path(path))
    check_tokenizer(tok, vocab_size, f"the tokenizer in '{path}'", pad_id, eos_id)
    return tok
