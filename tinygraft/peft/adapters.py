"""The adapter protocol: what every parameter-efficient method shares, whatever it computes.

An adapter method wraps chosen layers of any `nn.Module` in an `AdapterLayer`: the frozen base layer plus named
adapters, at most one of them active (none: the layer computes what the base computes). Everything a user does with
adapters goes through the functions below, the same for every method:

    add        a method's own `add_*` (peft/lora.py: `add_lora`) wraps the targeted layers, or gives a wrapped
               layer one more named adapter, and makes it the active one
    set        set_adapter(model, name)          which adapter runs (None, or `adapters_disabled`: the base alone)
    delete     delete_adapter(model, name)
    merge      merge_adapter(model) / unmerge_adapter(model) / unload(model): fold the active adapter into the base
               weights (inference at the base's cost), take it out again, or put the base layers back in place
    state      adapter_state_dict(model, name) / load_adapter_state_dict(model, state, name): the adapter's tensors
               keyed `<layer path>.<tensor>` (peft's keys with the adapter name dropped)
    save/load  peft/files.py: peft's file layout (adapter_config.json + adapter_model.safetensors)
    rows       mixed_batch(model, names): inside the block row i of every batch runs with adapter names[i], in one
               forward and one backward (each method's `forward` computes the rows together: LoRA through the
               segmented kernel, IA3 by gathering vectors, ...); each row's gradient reaches its own adapter

Targets are chosen with peft's rules (`match_targets`): a list of names matches a layer whose path is the name or
ends with "." + name, a string is a regex matched against the whole path, and "all-linear" is every linear layer
but the output head.
"""

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tinygraft.errors import TinygraftError

DEFAULT_ADAPTER = "default"
ALL_LINEAR = "all-linear"
# Linear layers "all-linear" leaves alone: the output projections, as peft does (it drops the model's output
# embeddings and, for classifiers, `score`/`classifier`).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
_NAMES = re.compile(r"^[\w.]+(,[\w.]+)*$")  # "c_attn,c_proj": module-name suffixes, not a regex


class AdapterLayer(nn.Module):
    """A frozen base layer with named adapters. A method's layer (LoRALinear, ...) fills in what it computes:
    `_create(name, config)`, `forward`, `delta_weight(name)` (what merging adds to the base weight, shaped like it)
    and `adapter_tensors(name)` (its parameters by local name)."""

    kind = "adapter"  # the method's name in messages: "LoRA", ...

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.settings: dict = {}  # adapter name -> its config
        self.active_adapter: str | None = None  # None: the base layer alone
        self.merged_adapters: list[str] = []  # adapters folded into base.weight
        self.row_adapters: list[str | None] | None = None  # in a mixed batch: each batch row's adapter

    def add_adapter(self, name: str, config) -> None:
        if name in self.settings:
            raise TinygraftError(f"this layer already has a {self.kind} adapter named {name!r}")
        self.settings[name] = config
        self._create(name, config)

    def _create(self, name: str, config) -> None:
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def weight_change(self, name: str) -> dict[str, torch.Tensor]:
        """What adapter `name` changes in the base's tensors, by local name ("weight", "bias"), in the autograd graph:
        the merged tensor minus the base's (EWC penalises it). Empty: the adapter adds modules beside the base
        (bottleneck, virtual tokens) and changes none of its tensors."""
        return {"weight": self.delta_weight(name)}

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What an adapter file keeps: its parameters, unless the method saves a folded form (prefix tuning's
        reparametrisation)."""
        return self.adapter_tensors(name)

    def _forget(self, name: str) -> None:
        """Drop the modules `_create` made for adapter `name`."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        self._known(name)
        if name in self.merged_adapters:
            raise TinygraftError(f"{self.kind} adapter {name!r} is merged into the base weights; unmerge it first")
        self._forget(name)
        del self.settings[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        if name is not None:
            self._known(name)
        self.active_adapter = name

    def _known(self, name: str) -> None:
        if name not in self.settings:
            raise TinygraftError(f"no {self.kind} adapter named {name!r} (this layer has {', '.join(self.settings)})")

    def adapter_in(self, name: str | None) -> str | None:
        """`name` (default: the active adapter) when this layer has it, else None."""
        name = name or self.active_adapter
        return name if name in self.settings else None

    def row_groups(self, device) -> tuple[list[str], torch.Tensor]:
        """In a mixed batch: the adapters of this layer that rows name (first seen first) and each row's index into
        them; -1 for a row whose adapter is not on this layer (it runs the base alone, as set_adapter would)."""
        names = [n for n in dict.fromkeys(self.row_adapters) if n in self.settings]
        index = {n: i for i, n in enumerate(names)}
        rows = [index.get(n, -1) for n in self.row_adapters]
        return names, torch.tensor(rows, dtype=torch.long, device=device)

    def rows_of(self, batch: int) -> int:
        """Check that a batch of `batch` rows is the mixed batch's; returns it."""
        if batch != len(self.row_adapters):
            raise TinygraftError(
                f"the mixed batch names {len(self.row_adapters)} rows' adapters but the {self.kind} layer got a batch "
                f"of {batch}"
            )
        return batch

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold an adapter into the base weight (in fp32, cast back): the layer then runs at the base's cost."""
        name = name or self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        self._known(name)
        self._fold(name, undo=False)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            self._fold(self.merged_adapters.pop(), undo=True)

    def _fold(self, name: str, undo: bool) -> None:
        """Add the adapter's `delta_weight` to the base weight (subtract it, `undo`); a method whose update is not
        additive (IA3 scales) overrides this."""
        w = self.base.weight
        delta = self.delta_weight(name)
        w.copy_((w.to(delta.dtype) + (-delta if undo else delta)).to(w.dtype))


def check_wrappable(base: nn.Module, kind: str) -> None:
    """One method per layer: a layer already wrapped by another method's adapters is refused in one sentence."""
    if isinstance(base, AdapterLayer):
        raise TinygraftError(
            f"that layer already holds {base.kind} adapters and a layer holds adapters of one method; give the "
            f"{kind} adapter other targets"
        )
    if not is_linear_like(base):
        raise TinygraftError(f"{kind} adapters wrap nn.Linear or a GPT-2 Conv1D, not {type(base).__name__}")


# ---------------------------------------------------------------------------------------------------- targets
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: y = x @ W + b with W (in, out) and `nf` = out (duck-typed: no import)."""
    weight = getattr(module, "weight", None)
    if not hasattr(module, "nf") or not isinstance(weight, torch.Tensor):
        return False
    return weight.dim() == 2 and weight.shape[1] == module.nf


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def parse_targets(targets: str | Sequence[str]) -> str | list[str]:
    """A command line's targets: "all-linear" | "c_attn,c_proj" (names a path ends with) | any other string, a regex
    on the whole path."""
    if not isinstance(targets, str):
        return list(targets)
    targets = targets.strip()
    if targets == ALL_LINEAR:
        return ALL_LINEAR
    if _NAMES.match(targets.replace(" ", "")):
        return targets.replace(" ", "").split(",")
    try:
        re.compile(targets)
    except re.error as e:
        raise TinygraftError(f"targets {targets!r} is neither a list of module names nor a valid regex ({e})") from None
    return targets


def _head_paths(model: nn.Module) -> set[str]:
    heads = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads |= {name for name, module in model.named_modules() if module is out_emb}
    return heads


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules and adapter layers by path, never the insides of an adapter layer."""
    wrappers = [name for name, _ in adapter_layers(model)]
    found = {}
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if is_linear_like(module.base if isinstance(module, AdapterLayer) else module):
            found[name] = module
    return found


def path_matches(path: str, spec: str | Sequence[str]) -> bool:
    """peft's rule for one path: a string is a regex on the whole path, a list names suffixes after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == s or path.endswith("." + s) for s in spec)


def auto_by_marker(model: nn.Module, table: Sequence[tuple], what: str, flags: str):
    """The rest of the first `table` row whose marker (a module path suffix that tells the family) the model has:
    how "auto" targets pick BERT's or GPT-2's layers by name."""
    names = [name for name, _ in model.named_modules()]
    for marker, *found in table:
        if any(path_matches(n, [marker]) for n in names):
            return found[0] if len(found) == 1 else tuple(found)
    raise TinygraftError(
        f"{what} targets 'auto' knows BERT and GPT-2 module names, and this model has neither; name the layers "
        f"with {flags}"
    )


def match_targets(model: nn.Module, targets: str | Sequence[str], what: str = "adapter") -> list[str]:
    """Paths of the linear layers `targets` names (peft's rules, see the module docstring)."""
    found = candidates(model)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = _head_paths(model)
        chosen = [name for name in found if name not in heads]
    else:
        spec = targets if isinstance(targets, str) else list(targets)
        hits = [name for name, _ in model.named_modules() if path_matches(name, spec)]
        wrappers = [w for w, _ in adapter_layers(model)]
        hits = [h for h in hits if not any(h.startswith(w + ".") for w in wrappers)]
        wrong = [h for h in hits if h not in found]
        if wrong:
            kind = type(model.get_submodule(wrong[0])).__name__
            raise TinygraftError(
                f"{what} target {wrong[0]!r} is a {kind}; targets must name linear layers (nn.Linear or Conv1D)"
            )
        chosen = hits
    if not chosen:
        some = ", ".join(list(found)[:6]) or "none"
        raise TinygraftError(f"{what} targets {targets!r} matched no linear layer (the model's linear layers: {some})")
    if "" in chosen:
        raise TinygraftError("the model itself is a linear layer; wrap it directly in an adapter layer")
    return chosen


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# ------------------------------------------------------------------------------------------------- the protocol
def adapter_layers(model: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter in every layer that has it, and every other adapter layer inactive (None: run
    the base model alone). Adapters of several methods may sit on one base, each on its own layers."""
    layers = [layer for _, layer in adapter_layers(model)]
    if name is not None and not any(name in layer.settings for layer in layers):
        known = sorted({n for layer in layers for n in layer.settings})
        raise TinygraftError(f"the model has no adapter named {name!r} (its adapters: {', '.join(known) or 'none'})")
    for layer in layers:
        layer.set_adapter(name if name in layer.settings else None)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model alone inside the block; each layer's active adapter comes back after it."""
    layers = [layer for _, layer in adapter_layers(model)]
    active = [layer.active_adapter for layer in layers]
    for layer in layers:
        layer.set_adapter(None)
    try:
        yield model
    finally:
        for layer, name in zip(layers, active):
            layer.active_adapter = name


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row i of each batch runs with adapter names[i] (None: the base alone), every row in the
    same forward; it equals running each row alone with set_adapter, forward and gradients. No merged adapter may be
    in the model (its update sits in the base weight every row shares)."""
    layers = [layer for _, layer in adapter_layers(model)]
    known = {n for layer in layers for n in layer.settings}
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise TinygraftError(f"the model has no adapter named {unknown[0]!r} (its adapters: "
                             f"{', '.join(sorted(known)) or 'none'})")  # fmt: skip
    merged = [n for layer in layers for n in layer.merged_adapters]
    if merged:
        raise TinygraftError(f"adapter {merged[0]!r} is merged into the base weights; unmerge it before a mixed batch")
    for layer in layers:
        layer.row_adapters = list(names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


def delete_adapter(model: nn.Module, name: str) -> None:
    layers = [layer for _, layer in adapter_layers(model) if name in layer.settings]
    if not layers:
        raise TinygraftError(f"the model has no adapter named {name!r}")
    for layer in layers:
        layer.delete_adapter(name)


def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    for _, layer in adapter_layers(model):
        layer.merge(name)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put each base layer back in place of its adapter layer (merging the active adapter first unless merge=False)."""
    for path, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        replace(model, path, layer.base)
    return model


def train_only(model: nn.Module, name: str, freeze_base: bool = True) -> int:
    """After an `add_*`: everything frozen (unless `freeze_base=False`) but adapter `name`; the trainable count."""
    if freeze_base:
        model.requires_grad_(False)
    for p in adapter_parameters(model, name):
        p.requires_grad_(True)
    return count_trainable(model)


def train_adapters(model: nn.Module, names: Sequence[str]) -> int:
    """Everything frozen but the named adapters (several train together in mixed batches); the trainable count."""
    model.requires_grad_(False)
    for name in names:
        if not any(name in layer.settings for _, layer in adapter_layers(model)):
            raise TinygraftError(f"the model has no adapter named {name!r}")
        for p in adapter_parameters(model, name):
            p.requires_grad_(True)
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() skips tied duplicates


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The tensors of one adapter (default: each layer's active one), in module order: what trains."""
    params = []
    for _, layer in adapter_layers(model):
        found = layer.adapter_in(name)
        if found is not None:
            params += list(layer.adapter_tensors(found).values())
    return params


def adapter_state_dict(model: nn.Module, name: str | None = None, saved: bool = False) -> dict[str, torch.Tensor]:
    """One adapter's tensors keyed `<layer path>.<tensor>` (peft's keys, adapter name dropped, without peft's
    `base_model.model.` prefix): its parameters, or with `saved` the form its files keep."""
    state = {}
    for path, layer in adapter_layers(model):
        found = layer.adapter_in(name)
        if found is not None:
            tensors = layer.saved_tensors(found) if saved else layer.adapter_tensors(found)
            state.update({f"{path}.{k}": v.detach() for k, v in tensors.items()})
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str | None = None) -> None:
    """Copy `adapter_state_dict`-style tensors into the model's adapters; every key must match, both ways."""
    own = {}
    for path, layer in adapter_layers(model):
        found = layer.adapter_in(name)
        if found is not None:
            own.update({f"{path}.{k}": v for k, v in layer.adapter_tensors(found).items()})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        which = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model has no layer for"
        raise TinygraftError(
            f"the adapter weights do not fit this model: the adapter {which} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, param in own.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise TinygraftError(
                f"adapter weight {key!r} is {tuple(state[key].shape)} in the adapter but {tuple(param.shape)} in the "
                "model"
            )
        param.copy_(state[key])
