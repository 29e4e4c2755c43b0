"""Several task adapters on one frozen base, trained together: `finetune --train NAME=FILE --val NAME=FILE ...`.

    --train sst2=sst2/train.tsv --val sst2=sst2/dev.tsv --train docs=docs/train.tsv --val docs=docs/dev.tsv

Each name gets its own adapter (of the one --method, with the one set of method flags) and its own task head (of
the one --task, with the one set of column flags); its label map is read from its own training file. Every batch
mixes rows of all names, in proportion to the files' sizes (one shuffled pass over their union per epoch), and runs
as one mixed batch (peft/adapters.py: mixed_batch): each row through its own adapter, the rows of each name through
its own head, the loss the mean over rows. Evaluation scores each name on its own validation file; the run's metric
is the mean of the names' primary metrics (`best` keeps the step where it peaked), and results.json reports each
name's metrics under `per_adapter`.

A checkpoint holds every adapter and head (`adapters.<name>.<path>`, `heads.<name>.*`) over the recorded base;
`predict`, `eval`, `embed` and `export --adapter` read one of them with `--adapter-name NAME`.
"""

import json
import re
from pathlib import Path

import torch
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features, TaskModel
from tinygraft.peft import adapters
from tinygraft.peft.files import CONFIG_NAME, adapter_config
from tinygraft.train.methods.adapter import BASE_FILE, AdapterMethod, hf_target

NAMED = re.compile(r"^([A-Za-z_][\w-]*)=(.+)$")
ADAPTERS, HEADS = "adapters.", "heads."


def named_files(value, flag: str) -> dict[str, str] | None:
    """{name: file} when `value` (one --train / --val, or the list of them repeated) names files NAME=FILE; None for
    a plain file. A name given twice, or a plain file among named ones, is one sentence."""
    values = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    if not any(NAMED.match(v) and not Path(v).exists() for v in values):
        if len(values) > 1:
            raise TinygraftError(f"{flag} is given {len(values)} times; several files train several adapters, each "
                                 f"given as {flag} NAME=FILE")  # fmt: skip
        return None
    named: dict[str, str] = {}
    for v in values:
        m = NAMED.match(v)
        if m is None:
            raise TinygraftError(f"{flag} {v!r} has no name; with several adapters each {flag} is NAME=FILE")
        name, file = m.groups()
        if name in named:
            raise TinygraftError(f"{flag} {name}=... is given twice; each name is one adapter trained on one file")
        named[name] = file
    return named


def pair_up(train: dict[str, str], val: dict[str, str] | None) -> dict[str, tuple[str, str | None]]:
    if val is not None and set(val) != set(train):
        extra = sorted(set(val) ^ set(train))[0]
        raise TinygraftError(f"--train and --val name different adapters ({extra!r} is in only one); give each name "
                             "both, or no --val")  # fmt: skip
    return {name: (file, (val or {}).get(name)) for name, file in train.items()}


class MultiTaskModel(nn.Module):
    """One backbone with one adapter and one head per name: a mixed batch's rows each through their own."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.names = list(heads)
        self.view = TaskModel(backbone, next(iter(heads.values())))  # checks the heads fit; encodes batches
        self.backbone = self.view.backbone
        self.heads = nn.ModuleDict(heads)
        self.family = self.view.family

    def task_model(self, name: str) -> TaskModel:
        """The backbone with adapter `name` active and head `name`: what predict, eval and export read."""
        if name not in self.heads:
            raise TinygraftError(f"this run has no adapter named {name!r} (its adapters: {', '.join(self.names)})")
        adapters.set_adapter(self.backbone, name)
        return TaskModel(self.backbone, self.heads[name])

    def forward(self, batch: dict):
        names = batch["adapter"]
        pair = getattr(self.view.head, "pair_inputs", False)
        with adapters.mixed_batch(self.backbone, names):
            feats = (self.view.encode(batch, "_a"), self.view.encode(batch, "_b")) if pair else self.view.encode(batch)
        total, rows_seen = 0.0, 0
        device = (feats[0] if pair else feats).hidden.device
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
            part = {k: _take(v, rows) for k, v in batch.items()}
            sub = tuple(_features(f, rows) for f in feats) if pair else _features(feats, rows)
            _, loss = self.heads[name](sub, part)
            total = total + loss * len(rows)
            rows_seen += len(rows)
        return {}, total / rows_seen


def _take(value, rows: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows)
    if isinstance(value, list):
        return [value[i] for i in rows.tolist()]
    return value


def _features(f: Features, rows: torch.Tensor) -> Features:
    pooled = f.pooled.index_select(0, rows) if f.pooled is not None else None
    return Features(f.hidden.index_select(0, rows), f.attention_mask.index_select(0, rows), pooled, f.lm_head)


class MultiAdapter(AdapterMethod):
    """An adapter method applied once per name; the heads train whole beside the adapters."""

    varying_graph = True  # a batch (or one process's share of it) may hold no row of some name

    def __init__(self, inner: AdapterMethod, names: list[str]):
        super().__init__(inner.settings, inner.base, inner.base_sha256)
        self.inner, self.names = inner, list(names)
        self.name, self.label, self.default_lr = inner.name, inner.label, inner.default_lr

    def bind_base(self, path) -> None:
        super().bind_base(path)
        self.inner.bind_base(path)

    def attach(self, model: MultiTaskModel) -> MultiTaskModel:
        if self.base is None:
            raise TinygraftError("several adapters train over a base read from a file (--from a pretrained "
                                 "directory or minilm); this base has none")  # fmt: skip
        self.verify_base()
        self.inner.base, self.inner.base_sha256 = self.base, self.base_sha256
        for name in self.names:
            self.inner.add(model.backbone, name)
        adapters.train_adapters(model, self.names)
        model.heads.requires_grad_(True)
        self.trainable = adapters.count_trainable(model)
        return model

    def param_groups(self, model: MultiTaskModel) -> list[dict]:
        own = [p for name in self.names for p in adapters.adapter_parameters(model.backbone, name)]
        return [{"params": own, "lr_scale": 1.0, "name": self.name},
                {"params": list(model.heads.parameters()), "lr_scale": 1.0, "name": "heads"}]  # fmt: skip

    def state_dict(self, model: MultiTaskModel) -> dict[str, torch.Tensor]:
        state = {}
        for name in self.names:
            own = adapters.adapter_state_dict(model.backbone, name)
            state.update({f"{ADAPTERS}{name}.{k}": v for k, v in own.items()})
            state.update({f"{HEADS}{name}.{k}": v.detach() for k, v in model.heads[name].state_dict().items()})
        return state

    def load_state_dict(self, model: MultiTaskModel, tensors: dict[str, torch.Tensor]) -> list[str]:
        stray = [k for k in tensors if not k.startswith((ADAPTERS, HEADS))]
        if stray:
            raise TinygraftError(f"the multi-adapter checkpoint holds {stray[0]!r}, neither an adapter nor a head")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        for name in self.names:
            adapters.load_adapter_state_dict(model.backbone, part(f"{ADAPTERS}{name}."), name)
            heads = part(f"{HEADS}{name}.")
            if set(heads) != set(model.heads[name].state_dict()):
                raise TinygraftError(f"the checkpoint's head for adapter {name!r} does not fit this run's")
            model.heads[name].load_state_dict(heads)
        return []

    def extra_files(self, model: MultiTaskModel) -> dict[str, bytes | str]:
        """base.json, and each name's peft config as adapter_config.<name>.json (the first's also as
        adapter_config.json, which the method's settings read back from)."""
        record = {"path": self.base, "sha256": self.base_sha256, "model": hf_target(model.backbone),
                  "adapter_in": "backbone.", "adapters": self.names}  # fmt: skip
        files = {BASE_FILE: json.dumps(record, indent=2) + "\n"}
        for i, name in enumerate(self.names):
            text = json.dumps(adapter_config(model.backbone, name, self.base), indent=2) + "\n"
            files[f"adapter_config.{name}.json"] = text
            if i == 0:
                files[CONFIG_NAME] = text
        return files

    def describe(self) -> dict:
        return {**self.inner.describe(), "adapters": self.names}


def per_adapter(metrics: dict, names: list[str]) -> dict[str, dict]:
    return {n: {k[len(n) + 1 :]: v for k, v in metrics.items() if k.startswith(n + ".")} for n in names}
