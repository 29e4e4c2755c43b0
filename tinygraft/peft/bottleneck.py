"""Bottleneck adapters on any PyTorch model: a small down-up MLP on a sub-layer's output, before its residual add.

    y = base(x);   y + up(act(down(y)))       down: hidden -> hidden / reduction,  up: back, zero-initialised

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP") put one after the attention block's output
projection and one after the MLP's; Pfeiffer et al. 2021 ("AdapterFusion") keep only the MLP's, on par with half
the parameters. The up-projection starts at zero, so a wrapped model computes exactly what it computed before. The
adapter is non-linear, so it does not fold into the base weight: `merge` refuses in one sentence.

Targets: `"auto"` finds the output projections by the module names our GPT and BERT share with transformers'
(BERT: `attention.output.dense` and each layer's FFN `output.dense`; GPT-2: `attn.c_proj` and `mlp.c_proj`), the
MLP's alone for Pfeiffer. Any other model names its layers (names a path ends with, or a regex on the whole path).

peft has no bottleneck adapters (peft#244), so their files are a layout of ours in peft's shape (peft/files.py):
adapter_config.json {"peft_type": "BOTTLENECK", "variant", "reduction", "non_linearity", "target_modules"} and
adapter_model.safetensors `base_model.model.<path>.adapter_down.weight|bias`, `.adapter_up.weight|bias`.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygraft.core.config import setting
from tinygraft.errors import TinygraftError
from tinygraft.peft import adapters
from tinygraft.peft.adapters import DEFAULT_ADAPTER, AdapterLayer, is_conv1d

AUTO = "auto"
VARIANTS = ("houlsby", "pfeiffer")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
# (a module path suffix that tells the family, {variant: targets}) in peft's target syntax
_AUTO = [
    ("attention.self.key", {"houlsby": r"(.*\.)?attention\.output\.dense|(.*\.)?layer\.\d+\.output\.dense",
                            "pfeiffer": r"(.*\.)?layer\.\d+\.output\.dense"}),
    ("attn.c_attn", {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"]}),
]  # fmt: skip


@dataclass(frozen=True)
class BottleneckConfig:
    """One bottleneck adapter's settings (Houlsby or Pfeiffer: the method says which)."""

    adapter_reduction: int = setting(16, "hidden size / bottleneck size of each adapter", flag="adapter-reduction")
    adapter_act: Literal["relu", "gelu", "silu", "tanh"] = setting("relu", "the bottleneck's non-linearity",
                                                                   flag="adapter-act")  # fmt: skip
    adapter_targets: str = setting(
        AUTO,
        '"auto" (the attention and MLP output projections of a BERT or GPT-2 layout; the MLP\'s alone for Pfeiffer), '
        "module names a path ends with, or a regex matched against the full path",
        flag="adapter-targets",
    )

    def __post_init__(self):
        r = self.adapter_reduction
        if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
            raise TinygraftError(f"--adapter-reduction must be a positive integer; got {r!r}")
        if self.adapter_act not in ACTIVATIONS:
            raise TinygraftError(f"--adapter-act must be one of {', '.join(ACTIVATIONS)}; got {self.adapter_act!r}")


def resolve(model: nn.Module, targets: str, variant: str) -> str | list[str]:
    if targets != AUTO:
        return adapters.parse_targets(targets)
    return adapters.auto_by_marker(model, _AUTO, "adapter", "--adapter-targets")[variant]


class BottleneckLinear(AdapterLayer):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) whose output passes through named bottleneck adapters."""

    kind = "bottleneck"

    def __init__(self, base: nn.Module):
        adapters.check_wrappable(base, "bottleneck")
        super().__init__(base)
        self.out_features = base.weight.shape[1] if is_conv1d(base) else base.weight.shape[0]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.variants: dict[str, str] = {}  # adapter name -> "houlsby" | "pfeiffer", for its files

    def _create(self, name: str, config: BottleneckConfig) -> None:
        w = self.base.weight
        width = max(1, self.out_features // config.adapter_reduction)
        self.adapter_down[name] = nn.Linear(self.out_features, width, device=w.device, dtype=w.dtype)
        self.adapter_up[name] = nn.Linear(width, self.out_features, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.adapter_down[name].weight, std=0.02)  # near identity at first, as Houlsby et al.
        nn.init.zeros_(self.adapter_down[name].bias)
        nn.init.zeros_(self.adapter_up[name].weight)  # the adapter starts as the identity: the model unchanged
        nn.init.zeros_(self.adapter_up[name].bias)

    def _forget(self, name: str) -> None:
        del self.adapter_down[name], self.adapter_up[name]
        self.variants.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.row_adapters is not None:
            return self._forward_rows(y)
        name = self.active_adapter
        if name is None:
            return y
        act = ACTIVATIONS[self.settings[name].adapter_act]
        return y + self.adapter_up[name](act(self.adapter_down[name](y)))

    def _forward_rows(self, y: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each adapter runs on its own rows (gathered, then added back in place), so the rows of
        one adapter share its matmuls; adapters may differ in width and non-linearity."""
        names, idx = self.row_groups(y.device)
        self.rows_of(y.shape[0])
        out = y
        for g, name in enumerate(names):
            rows = (idx == g).nonzero().flatten()
            h = y.index_select(0, rows)
            act = ACTIVATIONS[self.settings[name].adapter_act]
            out = out.index_add(0, rows, self.adapter_up[name](act(self.adapter_down[name](h))))
        return out

    def weight_change(self, name: str) -> dict[str, torch.Tensor]:
        return {}  # modules beside the base; its tensors stay as they were

    def _fold(self, name: str, undo: bool) -> None:
        raise TinygraftError("bottleneck adapters are non-linear, so they do not merge into the base weights; export "
                             "the adapter with --adapter DIR, or the base and adapter as they are")  # fmt: skip

    def extra_repr(self) -> str:
        widths = ", ".join(f"{n}: {self.out_features} -> {m.out_features}" for n, m in self.adapter_down.items())
        return f"active={self.active_adapter!r}, adapters=[{widths}]"


def add_bottleneck(
    model: nn.Module,
    variant: str = "houlsby",
    targets: str | Sequence[str] = AUTO,
    reduction: int = 16,
    act: str = "relu",
    adapter_name: str = DEFAULT_ADAPTER,
    freeze_base: bool = True,
) -> int:
    """Wrap the targeted output projections in place (a layer wrapped before gains the new adapter), make
    `adapter_name` active, freeze every other parameter unless `freeze_base=False`; returns the trainable count."""
    if variant not in VARIANTS:
        raise TinygraftError(f"bottleneck adapters come as {' or '.join(VARIANTS)}, not {variant!r}")
    text = targets if isinstance(targets, str) else ",".join(targets)
    config = BottleneckConfig(reduction, act, text)
    for path in adapters.match_targets(model, resolve(model, text, variant), "adapter"):
        module = model.get_submodule(path)
        if not isinstance(module, BottleneckLinear):
            module = BottleneckLinear(module)
            adapters.replace(model, path, module)
        module.add_adapter(adapter_name, config)
        module.variants[adapter_name] = variant
        module.set_adapter(adapter_name)
    return adapters.train_only(model, adapter_name, freeze_base)


def bottleneck_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckLinear]]:
    return adapters.adapter_layers(model, BottleneckLinear)


def bottleneck_settings(model: nn.Module, adapter_name: str | None = None) -> dict:
    """The settings (the same in every layer add_bottleneck made) and the wrapped paths."""
    found = [(p, layer, layer.adapter_in(adapter_name)) for p, layer in bottleneck_layers(model)]
    found = [(p, layer, name) for p, layer, name in found if name is not None]
    if not found:
        raise TinygraftError(f"the model has no bottleneck adapter {adapter_name or '(active)'!r}")
    _, layer, name = found[0]
    config = layer.settings[name]
    return {"variant": layer.variants.get(name, "houlsby"), "reduction": config.adapter_reduction,
            "act": config.adapter_act, "paths": [p for p, _, _ in found]}  # fmt: skip
