"""Elastic weight consolidation (Kirkpatrick et al. 2017): continued training pays for moving the weights that the
old data needed.

    penalty = lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

theta* are the weights training starts from; F is the empirical diagonal Fisher on the old data, the mean over N
sequences of the squared gradient of each sequence's own loss, E_n[(d loss_n / d theta)^2]. Not the square of the
mean gradient (d mean-loss / d theta)^2, a common bug: near a minimum of the old loss the mean gradient is close to
zero, so every weight would look free to move.

The Fisher is computed once per run (one sequence per backward) and kept in the run directory as FILE, beside the
anchor theta*, never in the checkpoints. With an adapter method the base is frozen and theta - theta* of a wrapped
tensor is what the adapter changes in it (LoRA: s B A; DoRA and IA3 their own forms; `AdapterLayer.weight_change`),
so the penalty combines with every method that changes weights.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from tinygraft.core.checkpoint import atomic_write
from tinygraft.errors import TinygraftError
from tinygraft.peft.adapters import adapter_layers

FILE = "ewc.safetensors"


def fisher_diagonal(model: nn.Module, loss_fn: Callable, batches: Iterable) -> dict[str, torch.Tensor]:
    """Mean over `batches` (one sequence each) of every trainable parameter's squared gradient, in fp32, with the
    model in eval mode (no dropout: the Fisher of the function being kept)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training, count = model.training, 0
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    total[n] += p.grad.float() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise TinygraftError("EWC's Fisher needs at least one sequence of the old data")
    return {n: t / count for n, t in total.items()}


class EWC:
    """The penalty as a loop regulariser (`Job.regularizers`): `penalty(model)` each micro-batch."""

    def __init__(self, lam: float, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]):
        if set(fisher) != set(anchor):
            raise TinygraftError("EWC's Fisher and anchor name different parameters")
        self.lam, self.fisher, self.anchor = float(lam), fisher, anchor

    def _on(self, device) -> None:
        if next(iter(self.fisher.values())).device != device:
            self.fisher = {k: v.to(device) for k, v in self.fisher.items()}
            self.anchor = {k: v.to(device) for k, v in self.anchor.items()}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        model = getattr(model, "_orig_mod", model)
        device = next(model.parameters()).device
        self._on(device)
        total = torch.zeros((), device=device)
        for path, layer in adapter_layers(model):  # a wrapped tensor moves by what its adapter changes in it
            name = layer.active_adapter
            if name is None or name in layer.merged_adapters:
                continue
            for local, change in layer.weight_change(name).items():
                key = f"{path}.{local}"
                if key in self.fisher:
                    total = total + (self.fisher[key] * change.float() ** 2).sum()
        for key, p in model.named_parameters():  # a weight trained directly moves by itself
            if p.requires_grad and key in self.fisher:
                total = total + (self.fisher[key] * (p.float() - self.anchor[key]) ** 2).sum()
        return 0.5 * self.lam * total

    def save(self, run_dir: Path) -> None:
        tensors = {f"fisher.{k}": v.contiguous().cpu() for k, v in self.fisher.items()}
        tensors.update({f"anchor.{k}": v.detach().float().contiguous().cpu() for k, v in self.anchor.items()})
        atomic_write(Path(run_dir) / FILE, save(tensors))

    @classmethod
    def load(cls, lam: float, run_dir: Path) -> "EWC":
        path = Path(run_dir) / FILE
        if not path.is_file():
            raise TinygraftError(f"'{path}' is missing, so the run's EWC penalty cannot continue; start a new run")
        tensors = load_file(str(path))
        part = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        return cls(lam, part("fisher."), part("anchor."))


def check_method(method) -> None:
    """EWC penalises changes to weights; a method whose adapters leave every weight as it was gives it nothing."""
    if getattr(method, "changes_no_weights", False):  # bottleneck, prompt and prefix tuning
        raise TinygraftError(
            f"--ewc penalises changes to the model's weights, and --method {method.name} changes none (its adapters "
            "are modules beside them); use it without --ewc, or with full, lora, dora or ia3"
        )
