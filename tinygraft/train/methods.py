"""Methods: what differs between full fine-tuning, linear probes, frozen layers, LoRA and the other PEFT methods.

DESIGN.md: methods are plugins to one loop. A method answers four questions, at four points the loop calls:

1. `attach(model)`           what is attached to the model (LoRA wraps its Linear layers; `full` adds nothing).
                             Called once, before the optimizer exists. Returns the model to train.
2. `param_groups(model)`     which parameters can ever train and in which optimizer groups
                             (`[{"params": [...], "lr_scale": 1.0, "name": "..."}]`; the loop splits each group
                             into decay / no-decay halves). Every parameter not listed is frozen here.
3. `apply_schedule(model, step)`  changes scheduled at given steps (gradual unfreezing). Called before every
                             optimizer step with the 0-based step about to run, and again on resume, so it must set
                             the state *for that step* from scratch (idempotent), not apply deltas.
4. `state_dict(model)` / `load_state_dict(model, tensors)` / `extra_files(model)`  what a checkpoint stores.

Frozen parameters have `requires_grad=False`: autograd allocates no gradient for them, and AdamW skips a parameter
whose `.grad` is None, so it gets no optimizer state either (state appears lazily when a scheduled change unfreezes
it). Fine-tuning methods (linear-probe, top-k, gradual unfreeze, discriminative lr) and LoRA subclass `Method`.
"""

import torch
from torch import nn

from tinygraft.errors import TinygraftError


class Method:
    """The protocol; the default of each hook is what `full` does."""

    name = "method"

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters()], "lr_scale": 1.0, "name": "all"}]

    def apply_schedule(self, model: nn.Module, step: int) -> None:
        """Set `requires_grad` (and anything else scheduled) for optimizer step `step`."""

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


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for state_dict entries sharing storage (GPT's lm_head.weight is wte.weight)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape, t.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


class Full(Method):
    """Everything trains, in one group at the base learning rate."""

    name = "full"

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


METHODS: dict[str, type[Method]] = {"full": Full}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: later modules (finetune methods, LoRA) add themselves to METHODS by name."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **settings) -> Method:
    if name not in METHODS:
        raise TinygraftError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](**settings)
