"""LoRA on any PyTorch model: a wrapper for one linear layer, and model surgery that puts it where you ask.

    y = base(x) + (alpha / r) * B(A(dropout(x)))        Hu et al. 2021 (LoRA); rsLoRA scales by alpha / sqrt(r)
                                                         (Kalajdzievski 2023, "A rank stabilization scaling factor")

DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"; `use_dora=True`) splits the updated weight into a
learned magnitude m per output and a direction:  y = m / ||W + s B A|| * (W x + s B A dropout(x)) + b, the row norm
||.|| taken along the inputs and detached from the graph (the paper's section 4.3, as peft does), m starting at ||W||
so the model starts unchanged. The bracket is the fused LoRA kernel's output without its bias. peft, with dropout on
in training, computes W x + (m/n - 1) W dropout(x) + m/n s B A dropout(x) instead (a second base matmul); without
dropout, and in eval mode, the two are the same function.

The base layer (an `nn.Linear`, or a GPT-2 style `Conv1D` that stores its weight as (in, out)) stays frozen; A is
(r, in), Kaiming-uniform as in peft, and B is (out, r), zero, so a wrapped model starts out computing exactly what
it computed before. Several named adapters may live in one layer (`lora_A["default"]`, `lora_A["french"]`, ...);
one of them is active at a time. Parameter names follow peft's (`<path>.lora_A.<adapter>.weight`), which keeps the
peft file layout (peft/files.py) a matter of dropping the adapter name. Setting, merging, deleting and saving
adapters is the protocol every adapter method shares (peft/adapters.py); this file is what LoRA computes.

Typical use:

    n_trainable = add_lora(model, targets=["query", "value"], r=8, alpha=16)   # everything else frozen
    ...train...
    save_adapter(model, "out/adapter")          # tinygraft.peft.files: peft reads it
    merge_lora(model)                           # fold B @ A into the base weights for inference
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygraft.core.config import setting
from tinygraft.core.layers import dropout
from tinygraft.errors import TinygraftError
from tinygraft.kernels.lora import lora_linear
from tinygraft.kernels.lora_segmented import segmented_lora_linear
from tinygraft.peft import adapters
from tinygraft.peft.adapters import ALL_LINEAR, DEFAULT_ADAPTER, AdapterLayer, is_conv1d, is_linear_like

__all__ = ["ALL_LINEAR", "DEFAULT_ADAPTER", "LoRAConfig", "LoRALinear", "add_lora", "is_conv1d", "is_linear_like"]


@dataclass(frozen=True)
class LoRAConfig:
    """One LoRA adapter's settings: what `--method lora` shows as flags and what a run's config.json keeps."""

    r: int = setting(8, "rank of the adapters", flag="lora-r")
    alpha: float = setting(16.0, "scaling numerator: the update is alpha / r * B A", flag="lora-alpha")
    dropout: float = setting(0.0, "dropout on the adapters' input", flag="lora-dropout")
    targets: str = setting(
        ALL_LINEAR,
        '"all-linear" (every linear layer but the output head), module names a path ends with ("c_attn,c_proj", '
        '"query,value"), or a regex matched against the full path',
        flag="lora-targets",
    )
    use_rslora: bool = setting(False, "rank-stabilised scaling alpha / sqrt(r) (rsLoRA)", flag="lora-rslora")
    use_dora: bool = setting(
        False, "DoRA: a learned magnitude per output over the LoRA-updated direction", flag="lora-dora"
    )
    lora_init: Literal["default", "pissa"] = setting(
        "default",
        "A and B at start: default (Kaiming A, zero B) or pissa (the principal singular vectors of W, the base "
        "keeping the residual; exported as a rank-2r adapter of the original base)",
        flag="lora-init",
    )  # fmt: skip
    lora_plus_ratio: float = setting(
        1.0, "LoRA+: B learns at this multiple of A's learning rate (Hayou et al. 2024 use 16; 1 is plain LoRA)",
        flag="lora-plus-ratio",
    )  # fmt: skip

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def __post_init__(self):
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1):
            raise TinygraftError(f"LoRA rank r must be a positive integer; got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TinygraftError(f"LoRA dropout must be in [0, 1); got {self.dropout}")
        if not math.isfinite(self.alpha):
            raise TinygraftError(f"LoRA alpha must be a number; got {self.alpha}")
        if not (math.isfinite(self.lora_plus_ratio) and self.lora_plus_ratio > 0):
            raise TinygraftError(f"--lora-plus-ratio must be a positive number; got {self.lora_plus_ratio}")
        object.__setattr__(self, "lora_plus_ratio", float(self.lora_plus_ratio))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))


def _targets_text(targets: str | Sequence[str]) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


class LoRALinear(AdapterLayer):
    """A frozen linear layer plus named low-rank adapters; `fused=False` runs the unfused PyTorch math instead."""

    kind = "LoRA"

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        fused: bool = True,
        use_dora: bool = False,
        lora_init: str = "default",
    ):
        adapters.check_wrappable(base, "LoRA")
        super().__init__(base)
        self.fan_in_fan_out = is_conv1d(base)  # weight stored (in, out), peft's name for it
        self.in_features, self.out_features = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        self.lora_A = nn.ModuleDict()  # adapter name -> nn.Linear(in, r), weight (r, in)
        self.lora_B = nn.ModuleDict()  # adapter name -> nn.Linear(r, out), weight (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters: name -> m (out,)
        self.pissa_A0: dict[str, torch.Tensor] = {}  # PiSSA adapters: their starting A and B (not saved: the
        self.pissa_B0: dict[str, torch.Tensor] = {}  # base's SVD gives them again)
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm a merge divided by, to undo it exactly
        self.fused = fused
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, use_dora=use_dora, lora_init=lora_init)
        self.active_adapter = adapter_name

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, **kw):
        self.add(name, LoRAConfig(r, alpha, dropout, use_rslora=use_rslora, **kw))

    def add(self, name: str, config: LoRAConfig) -> None:
        super().add_adapter(name, config)

    def _create(self, name: str, config: LoRAConfig) -> None:
        w = self.base.weight
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as peft (and nn.Linear) do
        nn.init.zeros_(self.lora_B[name].weight)  # the update starts at zero
        if config.lora_init == "pissa":
            self._pissa(name, config)
        if config.use_dora:  # m = ||W + s B A|| per output row: the layer starts as the base
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).to(w.dtype))

    @torch.no_grad()
    def _pissa(self, name: str, config: LoRAConfig) -> None:
        """PiSSA (Meng et al. 2024): B A = the rank-r principal part of W / s, the base keeping W - s B A, so the
        layer starts as it was. The starting A0, B0 are kept: the update saved for peft is s (B A - B0 A0)."""
        if self.pissa_A0:
            raise TinygraftError("a layer takes one PiSSA adapter (its base holds that adapter's residual)")
        w = self.base_weight()
        dtype = torch.promote_types(w.dtype, torch.float32)
        U, S, Vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
        root = (S[: config.r] / config.scaling).sqrt()
        a, b = root[:, None] * Vh[: config.r], U[:, : config.r] * root[None, :]
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        w.copy_((w.to(dtype) - config.scaling * (b @ a)).to(w.dtype))
        self.pissa_A0[name] = self.lora_A[name].weight.detach().clone()
        self.pissa_B0[name] = self.lora_B[name].weight.detach().clone()

    def _forget(self, name: str) -> None:
        if name in self.pissa_A0:  # give the base its principal part back
            with torch.no_grad():
                w, s = self.base_weight(), self.settings[name].scaling
                a0, b0 = self.pissa_A0.pop(name), self.pissa_B0.pop(name)
                w.copy_((w.to(a0.dtype) + s * (b0 @ a0)).to(w.dtype))
        del self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        tensors = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return tensors

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| per output row, in fp32 (fp64 for a fp64 base), outside the graph."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        return torch.linalg.vector_norm(self.base_weight().to(dtype) + self.settings[name].scaling * (b @ a), dim=1)

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view (transposed for Conv1D)."""
        return self.base.weight.t() if self.fan_in_fan_out else self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._forward_rows(x)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return self.base(x)
        A, B, cfg = self.lora_A[name], self.lora_B[name], self.settings[name]
        p = cfg.dropout if self.training else 0.0
        bias = self.base.bias
        if cfg.use_dora:  # the bias is added after the magnitude scales the rest
            scale = self.lora_magnitude_vector[name] / self.weight_norm(name)
        if not self.fused:
            if cfg.use_dora:
                y = F.linear(x, self.base_weight()) + cfg.scaling * B(A(dropout(x, p)))
                y = y * scale.to(y.dtype)
                return y if bias is None else y + bias.to(y.dtype)
            return self.base(x) + cfg.scaling * B(A(dropout(x, p)))
        # The same math in one kernel pass: the r-wide update shares the base GEMM's output tiles.
        w = self.base_weight()
        a, b = (t.weight if t.weight.dtype == w.dtype else t.weight.to(w.dtype) for t in (A, B))
        if not cfg.use_dora:
            return lora_linear(x, w, bias, a, b, cfg.scaling, p)
        y = lora_linear(x, w, None, a, b, cfg.scaling, p)
        y = y * scale.to(y.dtype)  # y's dtype: autocast's, when it is on
        return y if bias is None else y + bias.to(y.dtype)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each row through its own adapter in one segmented kernel (kernels/lora_segmented.py), the
        adapters stacked and zero-padded to the largest rank; DoRA rows then take their own magnitude / norm."""
        names, idx = self.row_groups(x.device)
        rows = self.rows_of(x.shape[0])
        if not names:
            return self.base(x)
        w, bias = self.base_weight(), self.base.bias
        cfgs = [self.settings[n] for n in names]
        r = max(c.r for c in cfgs)
        a = torch.stack([F.pad(self.lora_A[n].weight.to(w.dtype), (0, 0, 0, r - c.r)) for n, c in zip(names, cfgs)])
        b = torch.stack([F.pad(self.lora_B[n].weight.to(w.dtype), (0, r - c.r)) for n, c in zip(names, cfgs)])
        p = [c.dropout if self.training else 0.0 for c in cfgs]
        per_row = x.numel() // (rows * x.shape[-1])  # tokens per batch row
        dora = any(c.use_dora for c in cfgs)
        y = segmented_lora_linear(x, w, None if dora else bias, a, b, [c.scaling for c in cfgs],
                                  idx.repeat_interleave(per_row), dropout_p=p)  # fmt: skip
        if not dora:
            return y
        ones = torch.ones(self.out_features, device=y.device, dtype=torch.promote_types(w.dtype, torch.float32))
        factors = [ones] + [
            (self.lora_magnitude_vector[n] / self.weight_norm(n)).to(ones.dtype) if c.use_dora else ones
            for n, c in zip(names, cfgs)
        ]
        factor = torch.stack(factors)[idx + 1]  # (rows, out); row -1 (the base alone) takes ones
        y = y * factor.view(rows, *([1] * (x.dim() - 2)), -1).to(y.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def _fold(self, name: str, undo: bool) -> None:
        """LoRA adds s B A; DoRA's merged weight is m / ||W + s B A|| * (W + s B A), undone with the same norm."""
        if not self.settings[name].use_dora:
            return super()._fold(name, undo)
        w = self.base.weight
        delta = self.delta_weight(name)  # shaped like base.weight
        rows = (lambda t: t[None, :]) if self.fan_in_fan_out else (lambda t: t[:, None])  # noqa: E731
        if undo:
            factor = self.lora_magnitude_vector[name].detach().to(delta.dtype) / self._merged_norms.pop(name)
            w.copy_((w.to(delta.dtype) / rows(factor) - delta).to(w.dtype))
            return
        norm = self.weight_norm(name)
        self._merged_norms[name] = norm
        factor = self.lora_magnitude_vector[name].detach().to(delta.dtype) / norm
        w.copy_(((w.to(delta.dtype) + delta) * rows(factor)).to(w.dtype))

    def weight_change(self, name: str) -> dict[str, torch.Tensor]:
        """LoRA's s B A; DoRA's m / ||W + s B A|| * (W + s B A) - W (the norm detached, as in its forward)."""
        delta = self.delta_weight(name)
        if not self.settings[name].use_dora:
            return {"weight": delta}
        w = self.base.weight.to(delta.dtype)
        factor = self.lora_magnitude_vector[name].to(delta.dtype) / self.weight_norm(name)
        factor = factor[None, :] if self.fan_in_fan_out else factor[:, None]
        return {"weight": (w + delta) * factor - w}

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32 (fp64 for a fp64 base), shaped like base.weight ((in, out) for Conv1D)."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        delta = self.settings[name].scaling * (b @ a)
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        adapters_ = ", ".join(f"{n}: r={s.r} alpha={s.alpha:g}" for n, s in self.settings.items())
        return f"{self.in_features} -> {self.out_features}, active={self.active_adapter!r}, adapters=[{adapters_}]"


# ---------------------------------------------------------------------------------------------------------------
# Model surgery.


def add_lora(
    model: nn.Module,
    targets: str | Sequence[str] = ALL_LINEAR,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    freeze_base: bool = True,
    fused: bool = True,
    use_dora: bool = False,
    lora_init: str = "default",
) -> int:
    """Wrap the targeted linear layers of `model` in place (a layer wrapped before gains the new adapter), make
    `adapter_name` active, freeze every other parameter unless `freeze_base=False`; returns the trainable count.
    `targets` follows peft's rules (peft/adapters.py: match_targets)."""
    config = LoRAConfig(r, alpha, dropout, _targets_text(targets), use_rslora, use_dora, lora_init)  # checked first
    if config.use_dora and config.lora_init == "pissa":
        raise TinygraftError("PiSSA initialises plain LoRA adapters; --lora-init pissa does not combine with DoRA")
    for path in adapters.match_targets(model, targets, "LoRA"):
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            module.add(adapter_name, config)
            module.set_adapter(adapter_name)
            continue
        wrapper = LoRALinear(module, config.r, config.alpha, config.dropout, use_rslora, adapter_name, fused,
                             use_dora=use_dora, lora_init=lora_init)  # fmt: skip
        wrapper.settings[adapter_name] = config
        adapters.replace(model, path, wrapper)
    if freeze_base:
        model.requires_grad_(False)
    for p in lora_parameters(model, adapter_name):
        p.requires_grad_(True)
    return adapters.count_trainable(model)


def add_lora_config(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER, **kw) -> int:
    """`add_lora` from a LoRAConfig (what a run's config.json holds)."""
    targets = adapters.parse_targets(config.targets)
    return add_lora(model, targets, config.r, config.alpha, config.dropout, config.use_rslora, adapter_name,
                    use_dora=config.use_dora, lora_init=config.lora_init, **kw)  # fmt: skip


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return adapters.adapter_layers(model, LoRALinear)


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The A and B weights of one adapter (default: each layer's active one), in module order: what trains."""
    params = []
    for _, layer in lora_layers(model):
        name = layer.adapter_in(adapter_name)
        if name is not None:
            params += list(layer.adapter_tensors(name).values())
    return params


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's weights keyed `<path>.lora_A.weight` / `<path>.lora_B.weight` (peft's keys, adapter name
    dropped, without peft's `base_model.model.` prefix)."""
    return adapters.adapter_state_dict(model, adapter_name)


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str | None = None):
    """Copy `lora_state_dict`-style weights into the model's adapters; every key must match, both ways."""
    adapters.load_adapter_state_dict(model, state, adapter_name)


set_adapter = adapters.set_adapter
count_trainable = adapters.count_trainable


def merge_lora(model: nn.Module, adapter_name: str | None = None):
    adapters.merge_adapter(model, adapter_name)


def unmerge_lora(model: nn.Module):
    adapters.unmerge_adapter(model)


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put each base layer back in place of its wrapper (merging the active adapter first unless merge=False)."""
    return adapters.unload(model, merge)


def lora_settings(model: nn.Module, adapter_name: str | None = None) -> dict:
    """r, alpha, dropout, use_rslora of one adapter (the same in every layer add_lora made) plus the wrapped paths
    and whether any base is a Conv1D: what a checkpoint or an adapter_config.json needs to rebuild it."""
    found = [(path, layer, layer.adapter_in(adapter_name)) for path, layer in lora_layers(model)]
    found = [(path, layer, name) for path, layer, name in found if name is not None]
    if not found:
        raise TinygraftError(f"the model has no LoRA adapter {adapter_name or '(active)'!r}; call add_lora first")
    distinct = {layer.settings[name] for _, layer, name in found}
    if len(distinct) > 1:
        raise TinygraftError("this adapter's layers differ in r/alpha/dropout; save them one setting at a time")
    settings = {k: v for k, v in asdict(distinct.pop()).items() if k != "targets"}
    paths = [path for path, _, _ in found]
    return {**settings, "paths": paths, "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer, _ in found)}
