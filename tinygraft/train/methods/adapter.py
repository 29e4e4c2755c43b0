"""What every adapter method (LoRA, and the parameter-efficient methods after it) does the same way in the loop.

    attach          the method's own `add` over the model (over a TaskModel's backbone); every base weight frozen
    param_groups    [the adapters' tensors] + [the task head's weights] (peft's `modules_to_save`)
    state_dict      the adapter (`<path>.lora_A.weight`, ...) + `head.*`: no base weights
    extra_files     the adapter's peft config (adapter_config.json) and base.json: where the base came from and the
                    sha256 of its weights

A checkpoint of an adapter run is a few hundred kilobytes, not a model: the base is read again from the directory
base.json names (the shipped MiniLM by name, any other by its absolute path), whose weights must still hash to the
recorded sha256, so an adapter is never laid over a base other than the one it was trained on. A base with no file
(a model built from a preset and trained from scratch) cannot be read again, so such a run's checkpoints keep the
base weights too.
"""

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.models import hf
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT
from tinygraft.models.heads import TaskModel
from tinygraft.models.pretrained import locate, record_name
from tinygraft.peft import adapters
from tinygraft.train.methods.base import Method

BASE_FILE = "base.json"
HEAD = "head."  # a TaskModel's head parameters, saved whole


def weights_sha256(base: str | Path) -> str:
    """sha256 of a directory's weights: of model.safetensors (or of its shards concatenated, in name order)."""
    digest = hashlib.sha256()
    for file in hf.weight_files(locate(base)):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def check_base(base: str | Path, expected_sha: str, what: str = "adapter") -> None:
    """Refuse to lay an adapter over a base other than the one it was trained on."""
    path = locate(base)
    if not path.is_dir():
        raise TinygraftError(
            f"the base model {str(base)!r} of this {what} run no longer exists; put it back there "
            "(the run stores only the adapter)"
        )
    actual = weights_sha256(path)
    if actual != expected_sha:
        raise TinygraftError(
            f"the base model {str(path)!r} changed since this {what} run was trained (its weights "
            f"hash to sha256 {actual[:16]}..., the run recorded {expected_sha[:16]}...); restore "
            "that base or start a new run"
        )


def read_base_record(step_dir: str | Path) -> dict:
    path = Path(step_dir) / BASE_FILE
    if not path.is_file():
        raise TinygraftError(f"checkpoint {str(step_dir)!r} has no {BASE_FILE}, so it is not an adapter checkpoint")
    return read_json(path, "adapter base record")


def is_adapter_checkpoint(step_dir: str | Path) -> bool:
    return (Path(step_dir) / BASE_FILE).is_file()


def hf_target(module: nn.Module) -> str:
    """How models.pretrained.load_pretrained_model rebuilds this module from its base directory."""
    for cls, name in ((GPT, "gpt"), (BERTForMaskedLM, "mlm"), (BERT, "bert")):
        if isinstance(module, cls):
            return name
    return type(module).__name__


class AdapterMethod(Method):
    """Adapters on the targeted layers; the base frozen, a TaskModel's head trained whole. A subclass says what it
    adds (`add(root)`), its peft config (`peft_config(root)`) and how its settings read back from a checkpoint."""

    attaches_modules = True
    jobs = frozenset({"pretrain", "finetune"})
    label = "adapter"  # the method's name in messages ("LoRA")

    def __init__(self, settings=None, base: str | Path | None = None, base_sha256: str | None = None):
        super().__init__(settings)
        self.base = record_name(base) if base is not None else None
        self.base_sha256 = base_sha256  # set: the checkpoint's record, checked in attach
        self.trainable = 0

    def bind_base(self, path: str | Path | None) -> None:
        """The directory whose weights file the model was read from byte for byte (None: it has none)."""
        self.base = record_name(path) if path is not None else None

    @classmethod
    def settings_from_checkpoint(cls, step_dir: Path):
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, step_dir: str | Path) -> "AdapterMethod":
        """The method a checkpoint was written by (settings from its files, the base from base.json); attach()
        then refuses a base whose weights changed."""
        record = read_base_record(step_dir)
        return cls(cls.settings_from_checkpoint(Path(step_dir)), record["path"], record["sha256"])

    def add(self, root: nn.Module, name: str = adapters.DEFAULT_ADAPTER) -> None:
        """Add adapter `name` (a multi-adapter run adds one per name) to `root`."""
        raise NotImplementedError

    def peft_config(self, root: nn.Module) -> tuple[str, dict]:
        """(file name, contents) of the adapter's config in peft's layout."""
        raise NotImplementedError

    @staticmethod
    def root(model: nn.Module) -> nn.Module:
        """Where the adapters go: a TaskModel's backbone (its head trains whole), else the model itself."""
        return model.backbone if isinstance(model, TaskModel) else model

    def verify_base(self) -> None:
        """Record the base's sha256 on a new run; refuse a base whose weights changed since the checkpoint's."""
        if self.base is None:
            return
        if self.base_sha256 is None:
            self.base_sha256 = weights_sha256(self.base)
        else:
            check_base(self.base, self.base_sha256, self.label)

    def attach(self, model: nn.Module) -> nn.Module:
        self.verify_base()
        self.add(self.root(model))
        model.requires_grad_(False)
        for p in adapters.adapter_parameters(self.root(model)) + self._saved_params(model):
            p.requires_grad_(True)
        self.trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        return model

    def _saved_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """prefix -> module saved (and trained) whole: a TaskModel's head, as peft's `modules_to_save`."""
        return {HEAD: model.head} if self.root(model) is not model else {}

    def _saved_params(self, model: nn.Module) -> list[nn.Parameter]:
        own = {id(p) for p in adapters.adapter_parameters(self.root(model))}
        params = [p for m in self._saved_modules(model).values() for p in m.parameters()]
        return [p for p in {id(p): p for p in params}.values() if id(p) not in own]

    def param_groups(self, model: nn.Module) -> list[dict]:
        groups = [{"params": adapters.adapter_parameters(self.root(model)), "lr_scale": 1.0, "name": self.name}]
        saved = self._saved_params(model)
        if saved:
            groups.append({"params": saved, "lr_scale": 1.0, "name": "head"})
        return groups

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _prefix(self, model: nn.Module) -> str:
        return "backbone." if self.root(model) is not model else ""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.base is None:  # nothing to read the base back from: keep the whole model
            return super().state_dict(model)
        prefix = self._prefix(model)
        state = {prefix + k: v for k, v in adapters.adapter_state_dict(self.root(model)).items()}
        for name, module in self._saved_modules(model).items():
            state.update({name + k: v.detach() for k, v in module.state_dict().items()})
        return state

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Strict: every adapter and head tensor present, nothing else (a checkpoint with base weights in it is
        a full model's, or a from-scratch adapter run's, and is refused here when this run has a base file)."""
        if self.base is None:
            return super().load_state_dict(model, tensors)
        tensors = dict(tensors)
        for name, module in self._saved_modules(model).items():
            own = module.state_dict()
            part = {k[len(name) :]: tensors.pop(k) for k in list(tensors) if k.startswith(name)}
            missing, unexpected = sorted(set(own) - set(part)), sorted(set(part) - set(own))
            if missing or unexpected:
                which = f"lacks {name + missing[0]!r}" if missing else f"has {name + unexpected[0]!r}, not in the model"
                raise TinygraftError(f"the {self.label} checkpoint does not fit this model: it {which}")
            for k, v in part.items():
                if v.shape != own[k].shape:
                    raise TinygraftError(
                        f"checkpoint tensor {name + k!r} has shape {tuple(v.shape)}, the model "
                        f"expects {tuple(own[k].shape)}"
                    )
            module.load_state_dict(part, strict=True)
        prefix = self._prefix(model)
        stray = [k for k in tensors if not k.startswith(prefix)]
        if stray:
            raise TinygraftError(
                f"the {self.label} checkpoint holds {stray[0]!r}, which is neither an adapter nor head weight"
            )
        adapters.load_adapter_state_dict(self.root(model), {k[len(prefix) :]: v for k, v in tensors.items()})
        return []

    def extra_files(self, model: nn.Module) -> dict[str, bytes | str]:
        root = self.root(model)
        record = {
            "path": self.base,
            "sha256": self.base_sha256,
            "model": hf_target(root),
            "adapter_in": self._prefix(model) or None,
        }
        name, config = self.peft_config(root)
        return {name: json.dumps(config, indent=2) + "\n", BASE_FILE: json.dumps(record, indent=2) + "\n"}

    def describe(self) -> dict:
        return {**super().describe(), "base": self.base}
