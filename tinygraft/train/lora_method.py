"""LoRA as a method of the one training loop: the base frozen, the low-rank adapters (and a task head) train.

    attach          add_lora(...) on the model (on the backbone of a TaskModel); every base weight frozen
    param_groups    [lora A/B weights] + [the task head's weights] (peft's `modules_to_save`)
    state_dict      the adapter (`<path>.lora_A.weight`, as peft.lora.lora_state_dict) + `head.*`: no base weights
    extra_files     adapter_config.json (peft's) and base.json (where the base came from, and its sha256)

A checkpoint of a LoRA run is a few hundred kilobytes, not a model: the base is read again from the path in
base.json, whose weights must still hash to the recorded sha256 (DESIGN.md section 2), so an adapter is never laid
over a base other than the one it was trained on. A base with no file (a model built from a preset and trained
from scratch) cannot be read again, so such a run's checkpoints keep the base weights too.

    method = LoRAMethod(r=8, alpha=16, targets="c_attn,c_proj", base_path="models/gpt2")
    method = LoRAMethod.from_checkpoint("runs/lora/checkpoints/step-00000300")   # to resume or export: base checked
"""

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.peft.adapters import parse_targets
from tinygraft.peft.files import CONFIG_NAME, adapter_config, read_adapter_config
from tinygraft.peft.lora import (
    ALL_LINEAR,
    LoRAConfig,
    add_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
)
from tinygraft.train.methods import Method, register

BASE_FILE = "base.json"
HEAD = "head."  # a TaskModel's head parameters, saved whole
_NAMES = re.compile(r"^[\w.]+(,[\w.]+)*$")  # "c_attn,c_proj": module-name suffixes, not a regex


# ---------------------------------------------------------------------------------------------------- the base
def weights_sha256(base_path: str | Path) -> str:
    """sha256 of the base's weights: of model.safetensors (or of its shards concatenated, in name order)."""
    from tinygraft.models.hf import weight_files

    digest = hashlib.sha256()
    for file in weight_files(Path(base_path)):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def check_base(base_path: str | Path, expected_sha: str) -> None:
    """Refuse to lay an adapter over a base other than the one it was trained on."""
    if not Path(base_path).is_dir():
        raise TinygraftError(f"the base model {str(base_path)!r} of this LoRA run no longer exists; put it back there "
                             "(the run stores only the adapter)")  # fmt: skip
    actual = weights_sha256(base_path)
    if actual != expected_sha:
        raise TinygraftError(f"the base model {str(base_path)!r} changed since this LoRA run was trained (its weights "
                             f"hash to sha256 {actual[:16]}..., the run recorded {expected_sha[:16]}...); restore "
                             "that base or start a new run")  # fmt: skip


def read_base_record(step_dir: str | Path) -> dict:
    path = Path(step_dir) / BASE_FILE
    if not path.is_file():
        raise TinygraftError(f"checkpoint {str(step_dir)!r} has no {BASE_FILE}, so it is not a LoRA checkpoint")
    return read_json(path, "LoRA base record")


def _load_report(model: nn.Module):
    """hf.LoadReport left on a model by models.pretrained.load_pretrained (on the model or a TaskModel's backbone)."""
    for m in (model, getattr(model, "backbone", None)):
        if getattr(m, "load_report", None) is not None:
            return m.load_report
    return None


def _family(module: nn.Module) -> str:
    """The `target` of hf.load_pretrained_model that rebuilds this module from its base directory."""
    from tinygraft.models.bert import BERT, BERTForMaskedLM
    from tinygraft.models.gpt import GPT

    for cls, name in ((GPT, "gpt"), (BERTForMaskedLM, "mlm"), (BERT, "bert")):
        if isinstance(module, cls):
            return name
    return type(module).__name__


# ---------------------------------------------------------------------------------------------------- the method
@register
class LoRAMethod(Method):
    """Low-rank adapters on the targeted linear layers; the base frozen, a TaskModel's head trained whole."""

    name = "lora"

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: str | Sequence[str] = ALL_LINEAR, use_rslora: bool = False,
                 base_path: str | Path | None = None, base_sha256: str | None = None):  # fmt: skip
        self.settings = LoRAConfig(int(r), float(alpha), float(dropout), use_rslora=bool(use_rslora))  # validates now
        self.targets = parse_targets(targets)
        self.base_path = str(Path(base_path).resolve()) if base_path is not None else None
        self.base_sha256 = base_sha256  # set: the checkpoint's record, checked in attach
        self.find_base = base_path is None  # take the path a models.pretrained load left on the model, if any
        self.trainable = 0

    @classmethod
    def from_checkpoint(cls, step_dir: str | Path) -> "LoRAMethod":
        """The method a LoRA checkpoint was written by (settings from its adapter_config.json, base from base.json);
        attach() then refuses a base whose weights changed."""
        base = read_base_record(step_dir)
        config = read_adapter_config(step_dir)
        method = cls(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config["lora_dropout"]),
                     targets=config["target_modules"], use_rslora=bool(config.get("use_rslora", False)),
                     base_path=base["path"], base_sha256=base["sha256"])  # fmt: skip
        method.find_base = False  # a run without a base file keeps its base in the checkpoint, whatever the model
        return method

    @staticmethod
    def lora_root(model: nn.Module) -> nn.Module:
        """Where the adapters go: a TaskModel's backbone (its head trains whole), else the model itself."""
        from tinygraft.models.heads import TaskModel

        return model.backbone if isinstance(model, TaskModel) else model

    def attach(self, model: nn.Module) -> nn.Module:
        if self.base_path is None and self.find_base:
            report = _load_report(model)
            self.base_path = str(Path(report.path).resolve()) if report is not None else None
        if self.base_path is not None:
            if self.base_sha256 is None:
                self.base_sha256 = weights_sha256(self.base_path)
            else:
                check_base(self.base_path, self.base_sha256)
        root = self.lora_root(model)
        s = self.settings
        add_lora(root, self.targets, r=s.r, alpha=s.alpha, dropout=s.dropout, use_rslora=s.use_rslora)
        model.requires_grad_(False)
        for p in lora_parameters(root) + self._saved_params(model):
            p.requires_grad_(True)
        self.trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        return model

    def _saved_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """prefix -> module saved (and trained) whole: a TaskModel's head, as peft's `modules_to_save`."""
        return {HEAD: model.head} if self.lora_root(model) is not model else {}

    def _saved_params(self, model: nn.Module) -> list[nn.Parameter]:
        lora = {id(p) for p in lora_parameters(self.lora_root(model))}
        params = [p for m in self._saved_modules(model).values() for p in m.parameters()]
        return [p for p in {id(p): p for p in params}.values() if id(p) not in lora]

    def param_groups(self, model: nn.Module) -> list[dict]:
        groups = [{"params": lora_parameters(self.lora_root(model)), "lr_scale": 1.0, "name": "lora"}]
        saved = self._saved_params(model)
        if saved:
            groups.append({"params": saved, "lr_scale": 1.0, "name": "head"})
        return groups

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _prefix(self, model: nn.Module) -> str:
        return "backbone." if self.lora_root(model) is not model else ""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.base_path is None:  # nothing to read the base back from: keep the whole model
            return super().state_dict(model)
        prefix = self._prefix(model)
        state = {prefix + k: v for k, v in lora_state_dict(self.lora_root(model)).items()}
        for name, module in self._saved_modules(model).items():
            state.update({name + k: v.detach() for k, v in module.state_dict().items()})
        return state

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Strict: every adapter and head tensor present, nothing else (a checkpoint with base weights in it is
        a full model's, or a from-scratch LoRA run's, and is refused here when this run has a base file)."""
        if self.base_path is None:
            return super().load_state_dict(model, tensors)
        tensors = dict(tensors)
        for name, module in self._saved_modules(model).items():
            own = module.state_dict()
            part = {k[len(name):]: tensors.pop(k) for k in list(tensors) if k.startswith(name)}
            missing, unexpected = sorted(set(own) - set(part)), sorted(set(part) - set(own))
            if missing or unexpected:
                which = f"lacks {name + missing[0]!r}" if missing else f"has {name + unexpected[0]!r}, not in the model"
                raise TinygraftError(f"the LoRA checkpoint does not fit this model: it {which}")
            for k, v in part.items():
                if v.shape != own[k].shape:
                    raise TinygraftError(f"checkpoint tensor {name + k!r} has shape {tuple(v.shape)}, the model "
                                         f"expects {tuple(own[k].shape)}")  # fmt: skip
            module.load_state_dict(part, strict=True)
        prefix = self._prefix(model)
        stray = [k for k in tensors if not k.startswith(prefix)]
        if stray:
            raise TinygraftError(f"the LoRA checkpoint holds {stray[0]!r}, which is neither an adapter nor head weight")
        load_lora_state_dict(self.lora_root(model), {k[len(prefix):]: v for k, v in tensors.items()})
        return []

    def extra_files(self, model: nn.Module) -> dict[str, bytes | str]:
        root = self.lora_root(model)
        record = {"path": self.base_path, "sha256": self.base_sha256, "model": _family(root),
                  "adapter_in": self._prefix(model) or None}  # fmt: skip
        return {
            CONFIG_NAME: json.dumps(adapter_config(root, base_model_name_or_path=self.base_path), indent=2) + "\n",
            BASE_FILE: json.dumps(record, indent=2) + "\n",
        }

    def describe(self) -> dict:
        s = self.settings
        return {"method": self.name, "r": s.r, "alpha": s.alpha, "dropout": s.dropout,
                "targets": self.targets if isinstance(self.targets, str) else ",".join(self.targets),
                "use_rslora": s.use_rslora, "scaling": s.scaling, "base": self.base_path}  # fmt: skip


# ------------------------------------------------------------------------------------------------ reading back
def load_lora_model(step_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> tuple[nn.Module, list]:
    """The model a LoRA checkpoint adapts, with its adapter attached (unmerged): the base read from base.json's path
    (hash checked) or, for a run on a model built from a preset, rebuilt from `config` and loaded whole. A TaskModel's
    head has no place outside the fine-tuning job, so only the backbone comes back. Returns (model, notes)."""
    from tinygraft.models import hf

    record = read_base_record(step_dir)
    method = LoRAMethod.from_checkpoint(step_dir)
    notes = []
    if record["path"] is None:
        if record.get("adapter_in"):
            raise TinygraftError(f"checkpoint {str(step_dir)!r} adapts a task model built without a base file; "
                                 "it can be read back only by its fine-tuning job")  # fmt: skip
        from tinygraft.core.config import from_dict
        from tinygraft.models.presets import build_model, get_preset

        model = build_model(from_dict(type(get_preset(config["preset"])), config["model"], "model"))
        method.attach(model)
        method.load_state_dict(model, tensors)
        return model, notes
    model, _ = hf.load_pretrained_model(record["path"], record["model"])
    method.attach(model)  # checks the base's sha256 first
    prefix = record.get("adapter_in") or ""
    head = sorted(k for k in tensors if prefix and not k.startswith(prefix))
    if head:
        notes.append(f"task head left out ({len(head)} tensors: {head[0]}, ...); it has no Hugging Face layout")
    load_lora_state_dict(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model, notes
