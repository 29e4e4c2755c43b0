"""The method protocol: what differs between full fine-tuning, linear probes, frozen layers, LoRA and the other
parameter-efficient methods, as a small object the one loop (train/loop.py) calls at fixed points.

    attach(model)                what is attached to the model (LoRA wraps its linear layers; `full` adds nothing).
                                 Called once, before the optimizer exists. Returns the model to train.
    param_groups(model)          which parameters can ever train and in which optimizer groups
                                 ([{"params": [...], "lr_scale": 1.0, "name": "..."}]; the loop splits each group
                                 into decay / no-decay halves). Every parameter not listed is frozen.
    apply_schedule(model, step)  changes scheduled at given steps (gradual unfreezing). Called before every optimizer
                                 step with the 0-based step about to run, and again on resume, so it must set the
                                 state *for that step* from scratch (idempotent), not apply deltas.
    penalty(model)               a loss term the method adds to the objective's (None: none), every micro-batch
    state_dict(model) / load_state_dict(model, tensors) / extra_files(model)   what a checkpoint stores
    prepare(model, steps, steps_per_epoch)   called once by a job that knows its budget; returns lines to log
    fit(model, data)             a method that trains nothing (`trains_nothing`: zero-shot, few-shot) builds what it
                                 scores with from the job's data (`FitData`), before the loop; the loop then takes no
                                 optimizer step: it evaluates once and keeps that checkpoint. Returns lines to log

A method's settings are one dataclass (`Settings`, fields declared with core.config.setting: a default and a help
line each), which is what the command-line flags of every job in `jobs` are generated from, what a run's
config.json stores and what --resume compares. A method is one file and one registry line (methods/__init__.py).

Frozen parameters have `requires_grad=False`: autograd allocates no gradient for them, and AdamW skips a parameter
whose `.grad` is None, so it gets no optimizer state either (state appears lazily when a scheduled change unfreezes
it).
"""

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.tasks.base import NoSettings


class Method:
    """The protocol; the default of each hook is what `full` does."""

    name = "method"
    summary = ""  # one line for --help
    Settings: type = NoSettings
    jobs = frozenset({"finetune"})  # the jobs whose --method accepts it: "pretrain", "finetune"
    default_lr: float | None = None  # fine-tuning's learning rate unless --lr says otherwise
    from_lr: float | None = None  # continued pre-training's (pretrain --from), where the method applies
    alias: re.Pattern | None = None  # other names: top-k as top-2 ...
    changes_no_weights = False  # its trained modules sit beside the weights, which never change (EWC refuses it)
    attaches_modules = False  # attach() adds modules (adapters): its param_groups need the attached model
    trains_nothing = False  # `fit` builds it from the data and no parameter trains: the job runs 0 steps
    varying_graph = False  # which parameters a step uses changes from batch to batch (mixed-adapter batches)

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def settings_from_name(cls, name: str) -> dict | None:
        """Settings a name implies ("top-2": {"top_k": 2}), or None when the name is not this method's."""
        if name == cls.name:
            return {}
        m = cls.alias.match(name) if cls.alias is not None else None
        return cls.implied(m) if m else None

    @classmethod
    def implied(cls, match: re.Match) -> dict:
        return {}

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters()), "lr_scale": 1.0, "name": "all"}]

    def apply_schedule(self, model: nn.Module, step: int) -> None:
        """Set `requires_grad` (and anything else scheduled) for optimizer step `step`."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def prepare(self, model: nn.Module, steps: int, steps_per_epoch: int) -> list[str]:
        return []

    def fit(self, model: nn.Module, data: "FitData") -> list[str]:
        """Build what a method that trains nothing scores with, from the training data; returns lines to log."""
        return []

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model, a tied tensor once (under its first name, as Hugging Face files store GPT-2)."""
        aliases = tied_aliases(model)
        return {k: v for k, v in model.state_dict().items() if k not in aliases}

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Load a checkpoint's tensors; returns the names accepted but unused. Missing names are an error."""
        own = model.state_dict()
        tensors = dict(tensors)
        for alias, name in tied_aliases(model).items():
            if alias not in tensors and name in tensors:
                tensors[alias] = tensors[name]
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise TinygraftError(f"checkpoint lacks model tensor {missing[0]!r} ({len(missing)} missing in all)")
        for name, value in own.items():
            if tensors[name].shape != value.shape:
                raise TinygraftError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensors[name].shape)}, the model expects "
                    f"{tuple(value.shape)}"
                )
        model.load_state_dict({k: tensors[k] for k in own}, strict=True)
        return sorted(set(tensors) - set(own))

    def extra_files(self, model: nn.Module) -> dict[str, bytes | str]:
        """Files besides the tensors (an adapter_config.json, say) that a checkpoint of this method needs."""
        return {}

    def describe(self) -> dict:
        """The method and its settings, for logs and results.json."""
        return {"method": self.name, **dataclasses.asdict(self.settings)}


@dataclass
class FitData:
    """The job's data as a method that trains nothing reads it (`fit`; methods/noshot.py)."""

    task: str
    task_settings: object
    label_names: list[str]  # class id -> name
    train: list[dict]  # the training features, as the task encoded them (classify: input_ids, labels, ...)
    lines: list[int]  # each training feature's line in its file (what a run records of the examples it drew)
    tokenizer: object
    max_length: int
    batch_size: int
    pad_id: int
    seed: int
    device: torch.device


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for state_dict entries sharing storage (GPT's lm_head.weight is wte.weight)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: its own data_ptr() is always 0
        key = (local.data_ptr(), t.shape, local.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied tensors once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
