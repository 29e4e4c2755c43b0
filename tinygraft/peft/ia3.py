"""IA3 on any PyTorch model: learned vectors that rescale a layer's output, or its input (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

    y = base(x) * l          on keys and values (a target that is not feed-forward): l has the layer's outputs
    y = base(x * l)          on the MLP's down projection (a feed-forward target): l scales the inner activation

Every l starts at ones, so a wrapped model computes exactly what it computed before; nothing else trains. Both forms
fold into the base weight (merge: W rows times l, and the bias, or W columns times l), so a merged model runs at the
base's cost. The vectors keep peft's shapes and names (`<path>.ia3_l.<adapter>`: (out, 1) or (1, in)), which keeps
peft's file layout a matter of dropping the adapter name (peft/files.py).

Targets: `"auto"` picks the paper's layers by the module names our GPT and BERT share with transformers': BERT's
`key` and `value` and each layer's FFN `output.dense` (feed-forward); GPT-2's fused `c_attn` and `mlp.c_proj`
(feed-forward), as peft's GPT-2 default does — there one vector scales queries, keys and values alike, since the
three share one projection. Any other model names its targets and feed-forward layers (names a path ends with, or
a regex on the whole path), peft's rules.

    n_trainable = add_ia3(model)                                   # everything else frozen
    n_trainable = add_ia3(model, targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tinygraft.core.config import setting
from tinygraft.errors import TinygraftError
from tinygraft.peft import adapters
from tinygraft.peft.adapters import DEFAULT_ADAPTER, AdapterLayer, is_conv1d

AUTO = "auto"
# (a module path suffix that tells the family, targets, feed-forward targets), in peft's target syntax
_AUTO = [
    ("attention.self.key", r"(.*\.)?(key|value)|(.*\.)?layer\.\d+\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense"),
    ("attn.c_attn", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
]


@dataclass(frozen=True)
class IA3Config:
    """One IA3 adapter's settings: what `--method ia3` shows as flags and what a run's config.json keeps."""

    ia3_targets: str = setting(
        AUTO,
        '"auto" (keys, values and the MLP inner activation of a BERT or GPT-2 layout), module names a path ends with '
        '("key,value,output.dense"), or a regex matched against the full path',
        flag="ia3-targets",
    )
    ia3_feedforward: str = setting(
        AUTO,
        'the targets whose input is scaled (the MLP down projection) rather than their output; "auto" with auto '
        "targets, else names or a regex as for the targets",
        flag="ia3-feedforward",
    )


def resolve(model: nn.Module, config: IA3Config) -> tuple[str | list[str], str | list[str]]:
    """(targets, feed-forward targets) in peft's syntax: "auto" by the model's module names."""
    if (config.ia3_targets == AUTO) != (config.ia3_feedforward == AUTO):
        raise TinygraftError('IA3: give both --ia3-targets and --ia3-feedforward, or leave both "auto"')
    if config.ia3_targets != AUTO:
        return adapters.parse_targets(config.ia3_targets), adapters.parse_targets(config.ia3_feedforward)
    return adapters.auto_by_marker(model, _AUTO, "IA3", "--ia3-targets and --ia3-feedforward")


class IA3Linear(AdapterLayer):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) plus named IA3 vectors on its output or, for a
    feed-forward layer, its input."""

    kind = "IA3"

    def __init__(self, base: nn.Module, feedforward: bool):
        adapters.check_wrappable(base, "IA3")
        super().__init__(base)
        self.fan_in_fan_out = is_conv1d(base)
        self.in_features, self.out_features = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    def _create(self, name: str, config: IA3Config) -> None:
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        w = self.base.weight
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))

    def _forget(self, name: str) -> None:
        del self.ia3_l[name]

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l[name]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:  # a mixed batch: each row gathers its own adapter's vector
            names, idx = self.row_groups(x.device)
            rows = self.rows_of(x.shape[0])
            vectors = [self.ia3_l[n].flatten() for n in names]
            width = self.in_features if self.feedforward else self.out_features
            ones = torch.ones(width, device=x.device, dtype=self.base.weight.dtype)
            scale = torch.stack([ones, *vectors])[idx + 1].view(rows, *([1] * (x.dim() - 2)), width)
        else:
            name = self.active_adapter
            if name is None or name in self.merged_adapters:
                return self.base(x)
            scale = self.ia3_l[name].flatten()
        if self.feedforward:
            return self.base(x * scale.to(x.dtype))
        y = self.base(x)
        return y * scale.to(y.dtype)

    def weight_change(self, name: str) -> dict[str, torch.Tensor]:
        """(l - 1) times the rows or columns it scales, and the bias for an output vector."""
        w, b = self.base.weight, self.base.bias
        dtype = torch.promote_types(w.dtype, torch.float32)
        scale = self.ia3_l[name].flatten().to(dtype) - 1
        along_rows = self.feedforward == self.fan_in_fan_out
        change = {"weight": w.to(dtype) * (scale[:, None] if along_rows else scale[None, :])}
        if b is not None and not self.feedforward:
            change["bias"] = b.to(dtype) * scale
        return change

    def _fold(self, name: str, undo: bool) -> None:
        """Merging scales the base weight's rows or columns (and the bias) by the vector; undoing divides."""
        w, b = self.base.weight, self.base.bias
        dtype = torch.promote_types(w.dtype, torch.float32)
        scale = self.ia3_l[name].detach().flatten().to(dtype)
        if undo:
            if (scale == 0).any():
                raise TinygraftError(f"IA3 adapter {name!r} has a zero entry, so it cannot be taken out again")
            scale = 1.0 / scale
        # Linear weights are (out, in), Conv1D's (in, out): scale the output or the input axis of either.
        along_rows = self.feedforward == self.fan_in_fan_out
        shaped = scale[:, None] if along_rows else scale[None, :]
        w.copy_((w.to(dtype) * shaped).to(w.dtype))
        if b is not None and not self.feedforward:
            b.copy_((b.to(dtype) * scale).to(b.dtype))

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else "output"
        return f"{self.in_features} -> {self.out_features}, scales its {where}, active={self.active_adapter!r}"


def add_ia3(
    model: nn.Module,
    targets: str | Sequence[str] = AUTO,
    feedforward: str | Sequence[str] = AUTO,
    adapter_name: str = DEFAULT_ADAPTER,
    freeze_base: bool = True,
) -> int:
    """Wrap the targeted linear layers in place (a layer wrapped before gains the new adapter), make
    `adapter_name` active, freeze every other parameter unless `freeze_base=False`; returns the trainable count."""
    text = lambda t: t if isinstance(t, str) else ",".join(t)  # noqa: E731
    config = IA3Config(text(targets), text(feedforward))
    targets, feedforward = resolve(model, config)
    paths = adapters.match_targets(model, targets, "IA3")
    ff_paths = [p for p in paths if adapters.path_matches(p, feedforward)]
    stray = [p for p in adapters.candidates(model) if adapters.path_matches(p, feedforward) and p not in paths]
    if stray:
        raise TinygraftError(f"IA3 feed-forward layer {stray[0]!r} is not among the targets; feedforward names a "
                             "subset of them")  # fmt: skip
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, IA3Linear):
            module = IA3Linear(module, feedforward=path in ff_paths)
            adapters.replace(model, path, module)
        elif module.feedforward != (path in ff_paths):
            raise TinygraftError(f"IA3 layer {path!r} already scales its {'input' if module.feedforward else 'output'}"
                                 "; another adapter on it must do the same")  # fmt: skip
        module.add_adapter(adapter_name, config)
        module.set_adapter(adapter_name)
    return adapters.train_only(model, adapter_name, freeze_base)


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Linear]]:
    return adapters.adapter_layers(model, IA3Linear)


def ia3_settings(model: nn.Module, adapter_name: str | None = None) -> dict:
    """The wrapped paths, the feed-forward ones and whether any base is a Conv1D: what adapter_config.json needs."""
    found = [(path, layer) for path, layer in ia3_layers(model) if layer.adapter_in(adapter_name) is not None]
    if not found:
        raise TinygraftError(f"the model has no IA3 adapter {adapter_name or '(active)'!r}; call add_ia3 first")
    return {
        "paths": [path for path, _ in found],
        "feedforward": [path for path, layer in found if layer.feedforward],
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in found),
    }
