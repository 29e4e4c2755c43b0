"""LoRA on any PyTorch model: a wrapper for one linear layer, and model surgery that puts it where you ask.

    y = base(x) + (alpha / r) * B(A(dropout(x)))        Hu et al. 2021 (LoRA); rsLoRA scales by alpha / sqrt(r)
                                                         (Kalajievo 2023, "A rank stabilization scaling factor")

The base layer (an `nn.Linear`, or a GPT-2 style `Conv1D` that stores its weight as (in, out)) stays frozen; A is
(r, in), Kaiming-uniform as in peft, and B is (out, r), zero, so a wrapped model starts out computing exactly what
it computed before. Several named adapters may live in one layer (`lora_A["default"]`, `lora_A["french"]`, ...);
one of them is active at a time. Parameter names follow peft's (`<path>.lora_A.<adapter>.weight`), which keeps the
peft file layout in `lora_io.py` a matter of dropping the adapter name.

Typical use:

    n_trainable = add_lora(model, targets=["query", "value"], r=8, alpha=16)   # everything else frozen
    ...train...
    save_adapter(model, "out/adapter")          # tinygraft.peft.files: peft reads it
    merge_lora(model)                           # fold B @ A into the base weights for inference
"""

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.kernels.lora import lora_linear

DEFAULT_ADAPTER = "default"
ALL_LINEAR = "all-linear"
# Linear layers "all-linear" leaves alone: the output projections, as peft does (it drops the model's output
# embeddings and, for classifiers, `score`/`classifier`).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: y = x @ W + b with W (in, out) and `nf` = out (duck-typed: no import)."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
        and weight.shape[1] == module.nf  # fmt: skip


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class LoRASettings:
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r >= 1):
            raise TinygraftError(f"LoRA rank r must be a positive integer; got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TinygraftError(f"LoRA dropout must be in [0, 1); got {self.dropout}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank adapters; `fused=False` runs the unfused PyTorch math instead."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = DEFAULT_ADAPTER, fused: bool = True):  # fmt: skip
        super().__init__()
        if not is_linear_like(base):
            raise TinygraftError(f"LoRALinear wraps nn.Linear or a GPT-2 Conv1D, not {type(base).__name__}")
        self.base = base
        self.fan_in_fan_out = is_conv1d(base)  # weight stored (in, out), peft's name for it
        self.in_features, self.out_features = (base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1])
        self.base.requires_grad_(False)
        self.lora_A = nn.ModuleDict()  # adapter name -> nn.Linear(in, r), weight (r, in)
        self.lora_B = nn.ModuleDict()  # adapter name -> nn.Linear(r, out), weight (out, r)
        self.settings: dict[str, LoRASettings] = {}
        self.active_adapter: str | None = adapter_name  # None: the base layer alone
        self.merged_adapters: list[str] = []  # adapters folded into base.weight
        self.fused = fused
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        if name in self.settings:
            raise TinygraftError(f"this layer already has a LoRA adapter named {name!r}")
        self.settings[name] = LoRASettings(r, float(alpha), float(dropout), use_rslora)
        w = self.base.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as peft (and nn.Linear) do
        nn.init.zeros_(self.lora_B[name].weight)  # the update starts at zero

    def delete_adapter(self, name: str):
        self._known(name)
        if name in self.merged_adapters:
            raise TinygraftError(f"LoRA adapter {name!r} is merged into the base weights; unmerge it first")
        del self.lora_A[name], self.lora_B[name], self.settings[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None):
        if name is not None:
            self._known(name)
        self.active_adapter = name

    def _known(self, name: str):
        if name not in self.settings:
            raise TinygraftError(f"no LoRA adapter named {name!r} (this layer has {', '.join(self.settings)})")

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view (transposed for Conv1D)."""
        return self.base.weight.t() if self.fan_in_fan_out else self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return self.base(x)
        A, B, cfg = self.lora_A[name], self.lora_B[name], self.settings[name]
        p = cfg.dropout if self.training else 0.0
        if not self.fused:
            return self.base(x) + cfg.scaling * B(A(F.dropout(x, p)))
        # The same math in one kernel pass: the r-wide update shares the base GEMM's output tiles.
        w = self.base_weight()
        a, b = (t.weight if t.weight.dtype == w.dtype else t.weight.to(w.dtype) for t in (A, B))
        return lora_linear(x, w, self.base.bias, a, b, cfg.scaling, p)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32 (fp64 for a fp64 base), shaped like base.weight ((in, out) for Conv1D)."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        delta = self.settings[name].scaling * (b @ a)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, name: str | None = None):
        """Fold an adapter into the base weight (in fp32, cast back): the layer then runs at the base's cost."""
        name = name or self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        self._known(name)
        w = self.base.weight
        delta = self.delta_weight(name)
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self):
        w = self.base.weight
        while self.merged_adapters:
            delta = self.delta_weight(self.merged_adapters.pop())
            w.copy_((w.to(delta.dtype) - delta).to(w.dtype))

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={s.r} alpha={s.alpha:g}" for n, s in self.settings.items())
        return f"{self.in_features} -> {self.out_features}, active={self.active_adapter!r}, adapters=[{adapters}]"


# ---------------------------------------------------------------------------------------------------------------
# Model surgery.


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _head_paths(model: nn.Module) -> set[str]:
    heads = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads |= {name for name, module in model.named_modules() if module is out_emb}
    return heads


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules and existing LoRA layers by path, never the insides of a LoRA layer."""
    wrappers = [name for name, _ in lora_layers(model)]
    found = {}
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, LoRALinear) or is_linear_like(module):
            found[name] = module
    return found


def match_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Paths of the linear layers `targets` names, with peft's rules: a list of names matches a module whose path is
    the name or ends with "." + name; a string is a regex matched against the whole path; "all-linear" is every
    linear layer but the output head."""
    candidates = _candidates(model)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = _head_paths(model)
        chosen = [name for name in candidates if name not in heads]
    else:
        if isinstance(targets, str):
            hits = [name for name, _ in model.named_modules() if re.fullmatch(targets, name)]
        else:
            targets = list(targets)
            hits = [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
        wrappers = [w for w, _ in lora_layers(model)]
        hits = [h for h in hits if not any(h.startswith(w + ".") for w in wrappers)]
        wrong = [h for h in hits if h not in candidates]
        if wrong:
            raise TinygraftError(f"LoRA target {wrong[0]!r} is a {type(model.get_submodule(wrong[0])).__name__}; "
                                 "targets must name linear layers (nn.Linear or Conv1D)")  # fmt: skip
        chosen = hits
    if not chosen:
        some = ", ".join(list(candidates)[:6]) or "none"
        raise TinygraftError(f"LoRA targets {targets!r} matched no linear layer (the model's linear layers: {some})")
    if "" in chosen:
        raise TinygraftError("the model itself is a linear layer; wrap it directly with LoRALinear(model)")
    return chosen


def add_lora(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR, r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, use_rslora: bool = False, adapter_name: str = DEFAULT_ADAPTER,
             freeze_base: bool = True, fused: bool = True) -> int:  # fmt: skip
    """Wrap the targeted linear layers of `model` in place (a layer wrapped before gains the new adapter), make
    `adapter_name` active, freeze every other parameter unless `freeze_base=False`; returns the trainable count."""
    settings = LoRASettings(r, float(alpha), float(dropout), use_rslora)  # validates before any surgery
    for path in match_targets(model, targets):
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, alpha, dropout, use_rslora)
            module.set_adapter(adapter_name)
            continue
        parent_path, _, child = path.rpartition(".")
        wrapper = LoRALinear(module, settings.r, settings.alpha, settings.dropout, use_rslora, adapter_name, fused)
        setattr(model.get_submodule(parent_path), child, wrapper)
    if freeze_base:
        model.requires_grad_(False)
    for p in lora_parameters(model, adapter_name):
        p.requires_grad_(True)
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() skips tied duplicates


def set_adapter(model: nn.Module, name: str | None):
    """Make `name` the active adapter in every LoRA layer (None: run the base model alone)."""
    for _, layer in lora_layers(model):
        layer.set_adapter(name)


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The A and B weights of one adapter (default: each layer's active one), in module order: what trains."""
    params = []
    for _, layer in lora_layers(model):
        name = adapter_name or layer.active_adapter
        if name in layer.settings:
            params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return params


def merge_lora(model: nn.Module, adapter_name: str | None = None):
    for _, layer in lora_layers(model):
        layer.merge(adapter_name)


def unmerge_lora(model: nn.Module):
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put each base layer back in place of its wrapper (merging the active adapter first unless merge=False)."""
    for path, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, layer.base)
    return model


def _adapter_in(layer: LoRALinear, adapter_name: str | None) -> str | None:
    name = adapter_name or layer.active_adapter
    return name if name in layer.settings else None


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's weights keyed `<path>.lora_A.weight` / `<path>.lora_B.weight` (peft's keys, adapter name
    dropped, without peft's `base_model.model.` prefix)."""
    state = {}
    for path, layer in lora_layers(model):
        name = _adapter_in(layer, adapter_name)
        if name is not None:
            state[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            state[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str | None = None):
    """Copy `lora_state_dict`-style weights into the model's adapters; every key must match, both ways."""
    own = {}
    for path, layer in lora_layers(model):
        name = _adapter_in(layer, adapter_name)
        if name is not None:
            own[f"{path}.lora_A.weight"] = layer.lora_A[name].weight
            own[f"{path}.lora_B.weight"] = layer.lora_B[name].weight
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        which = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model has no layer for"
        raise TinygraftError(f"the LoRA adapter weights do not fit this model: the adapter {which} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")  # fmt: skip
    for key, param in own.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise TinygraftError(f"LoRA weight {key!r} is {tuple(state[key].shape)} in the adapter but "
                                 f"{tuple(param.shape)} in the model")  # fmt: skip
        param.copy_(state[key])


def lora_settings(model: nn.Module, adapter_name: str | None = None) -> dict:
    """r, alpha, dropout, use_rslora of one adapter (the same in every layer add_lora made) plus the wrapped paths
    and whether any base is a Conv1D: what a checkpoint or an adapter_config.json needs to rebuild it."""
    found = [(path, layer, _adapter_in(layer, adapter_name)) for path, layer in lora_layers(model)]
    found = [(path, layer, name) for path, layer, name in found if name is not None]
    if not found:
        raise TinygraftError(f"the model has no LoRA adapter {adapter_name or '(active)'!r}; call add_lora first")
    distinct = {layer.settings[name] for _, layer, name in found}
    if len(distinct) > 1:
        raise TinygraftError("this adapter's layers differ in r/alpha/dropout; save them one setting at a time")
    return {**asdict(distinct.pop()), "paths": [path for path, _, _ in found],
            "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer, _ in found)}  # fmt: skip
