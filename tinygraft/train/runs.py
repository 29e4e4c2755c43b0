"""Any path a command is given -> a loaded model, with its kind and its kept checkpoint: the one run loader.

    a Hugging Face directory, or `minilm`    kind "huggingface": GPT / BERT / BERTForMaskedLM, its tokenizer, the
                                             sentence-transformers pooling it ships, what the load left unused
    a pre-training run                       kind "pretrain": the model (an adapter run: its base read again, hash
    (its directory, its checkpoints/, or     checked, with the adapter attached), the tokenizer, the run's settings
     one step directory)
    a fine-tuning run                        kind "finetune": the TaskModel (backbone + head + the method's state),
                                             the tokenizer, the label map, the task and method with their settings

Every command that takes a run, a checkpoint or a pretrained directory (finetune --from, pretrain --from, predict,
sample, eval, embed, export, info) reads it here. A run's kept checkpoint is the one its results.json names: `best`
when it tracked a metric and kept its best step, else `latest`.

Runs outlive the code that wrote them: a config.json of an older form is brought to today's (`upgrade`), and a path
a run recorded is read relative to the run when it is not absolute (files inside the run are recorded that way, so a
run directory can move), the shipped MiniLM by its name.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tinygraft.core import checkpoint
from tinygraft.core.config import from_dict, to_dict
from tinygraft.data.labeled import LabelMap
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models import hf
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.heads import TaskModel
from tinygraft.models.pooling import Pooling
from tinygraft.models.presets import build_model, get_preset
from tinygraft.models.pretrained import (
    load_pretrained,
    load_pretrained_model,
    load_tokenizer,
    locate,
    resolve_pretrained,
)
from tinygraft.peft.adapters import load_adapter_state_dict
from tinygraft.tasks import get_task
from tinygraft.tasks.base import DataSettings
from tinygraft.train import methods, multi
from tinygraft.train.config import FinetuneConfig, FinetuneTrain, RunConfig, resolve_finetune
from tinygraft.train.methods.adapter import AdapterMethod, is_adapter_checkpoint, read_base_record

FORMAT = 2  # config.json's form: 1 (no "format" key) before the tree was reshaped; 2 since
KINDS = ("huggingface", "pretrain", "finetune")


@dataclass
class Loaded:
    kind: str  # "huggingface" | "pretrain" | "finetune"
    path: Path  # the directory asked for
    model: nn.Module  # in eval mode; a TaskModel for a fine-tuning run
    tokenizer: TextTokenizer | None
    config: dict  # a run's config.json (in today's form), or a pretrained directory's
    ckpt: checkpoint.Checkpoint | None = None
    report: hf.LoadReport | None = None  # what a pretrained directory's load accepted but did not use
    pooling: Pooling | None = None  # the sentence-transformers pooling a pretrained directory ships
    label_map: LabelMap | None = None
    unused: list[str] = field(default_factory=list)  # checkpoint tensors accepted but not used
    notes: list[str] = field(default_factory=list)
    base_file: Path | None = None  # the directory whose weights file `model` is, byte for byte (an adapter's base)
    run: RunConfig | None = None  # a pre-training run's settings
    model_cfg: GPTConfig | BERTConfig | None = None
    finetune: FinetuneConfig | None = None  # a fine-tuning run's settings
    method: methods.Method | None = None
    adapter: str | None = None  # a multi-adapter run's adapter that `model` runs (--adapter-name)


# --------------------------------------------------------------------------------------------------------- paths
def run_dir_of(step_dir: Path) -> Path | None:
    """The run directory two levels above a step directory (RUN/checkpoints/step-*), if it is one."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else None


def in_run(run_dir: Path | None, recorded: str | None) -> str | None:
    """A path a run recorded: relative ones are the run's own files (written by runs since format 2), else (older
    runs) relative to where the command ran."""
    if recorded is None or Path(recorded).is_absolute() or run_dir is None:
        return recorded
    inside = run_dir / recorded
    return str(inside) if inside.exists() else recorded


def record_path(path: str | None, run_dir: Path) -> str | None:
    """How a run records a file it reads: relative to the run when inside it (the run can move), else absolute."""
    if path is None:
        return None
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(p)


def kept_pointer(run: str | Path) -> str:
    """'best' when results.json says the run kept its best checkpoint and a `best` pointer exists, else 'latest'."""
    run = Path(run)
    results = run / "results.json"
    if results.is_file() and (run / "checkpoints" / "best").is_file():
        try:
            if json.loads(results.read_text(encoding="utf-8")).get("kept") == "best":
                return "best"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return "latest"


def config_kind(step_dir: Path) -> str | None:
    """'finetune' or 'pretrain' from a step directory's config.json, cheaply (None: unreadable; the full load that
    follows names the problem)."""
    try:
        return (
            "finetune"
            if json.loads((step_dir / "config.json").read_text(encoding="utf-8")).get("kind") == "finetune"
            else "pretrain"
        )
    except (OSError, ValueError, AttributeError):
        return None


def looks_like_run(path: Path) -> bool:
    """A run directory, its checkpoints/ directory, or one step directory (what checkpoint.resolve accepts)."""
    return (
        (path / "checkpoints").is_dir()
        or (path / "latest").is_file()
        or (path / checkpoint.TRAINER_STATE).is_file()
        or bool(checkpoint.STEP_DIR.match(path.name))
    )


def locate_spec(spec: str | Path, which: str | None = None) -> tuple[str, Path, Path | None]:
    """(kind, the directory, the step directory of a run) of `spec`, reading only small files."""
    path = resolve_pretrained(spec)
    if not path.exists():
        raise TinygraftError(
            f"checkpoint path {str(spec)!r} does not exist; give a tinygraft run or checkpoint, a "
            "Hugging Face model directory, or 'minilm'"
        )
    if path.is_dir() and hf.is_hf_dir(path):
        return "huggingface", path, None
    if not path.is_dir():
        raise TinygraftError(f"'{path}' is a file; give a directory (a pretrained model or a tinygraft run)")
    if not looks_like_run(path):
        raise TinygraftError(
            f"'{path}' is neither a tinygraft run or checkpoint nor a Hugging Face model directory "
            "(config.json naming a model_type, with model.safetensors)"
        )
    step_dir = checkpoint.resolve(path, which or kept_pointer(path))
    return config_kind(step_dir) or "pretrain", path, step_dir


# ------------------------------------------------------------------------------------------------ old configs
def upgrade(config: dict) -> dict:
    """A run's config.json in today's form (format 2), whichever tinygraft wrote it."""
    if config.get("format", 1) >= FORMAT:
        return config
    config = dict(config)
    if config.get("kind") == "finetune":
        config["finetune"] = _finetune_v1(config)
    else:  # format 1 kept the method's description (LoRA's r, alpha, ..., its scaling and base): its settings stay
        cls, _ = methods.lookup(config.get("method", "full"))
        kept = {k: v for k, v in (config.get("method_settings") or {}).items() if k in _names(cls.Settings)}
        config["method_settings"] = to_dict(methods.settings_for(cls.name, kept))
    config["format"] = FORMAT
    return config


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# Format 1 saved the fine-tuning flags flat; these are today's names of the ones that were renamed.
_RENAMED_V1 = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets",
               "lora_rslora": "use_rslora"}  # fmt: skip


def _finetune_v1(config: dict) -> dict:
    """The flat `finetune` arguments of a format-1 fine-tuning run as today's FinetuneConfig dict."""
    a = {_RENAMED_V1.get(k, k): v for k, v in config["finetune"].items()}
    task = get_task(a.get("task", config.get("task", "classify")))
    cls, _ = methods.lookup(a.get("method", "full"))
    # a flag left at its default was saved as None; today's settings take their own defaults for it
    given = {k: v for k, v in a.items() if v is not None}
    sections = {
        "data": {k: a[k] for k in _names(DataSettings) if k in a},
        "train": {k: a[k] for k in _names(FinetuneTrain) if k in a},
        "task_settings": {k: given[k] for k in _names(task.Settings) if k in given},
        "method_settings": {k: given[k] for k in _names(cls.Settings) if k in given},
    }
    top = {"source": a.get("from_", "minilm"), "task": task.name, "method": a.get("method", "full")}
    return to_dict(resolve_finetune({**top, **sections}, None, {}, None))


# ---------------------------------------------------------------------------------------------------- loading
def load(
    spec: str | Path,
    which: str | None = None,
    *,
    device: torch.device | str = "cpu",
    target: str | None = None,
    new_head: bool = False,
    adapter: str | None = None,
) -> Loaded:
    """The model `spec` names, in eval mode on `device` (see the module docstring). `which`: 'latest' or 'best' for
    a run (None: its kept checkpoint); `target` / `new_head`: how a pretrained directory is read (models/pretrained.py:
    load_pretrained_model); `adapter`: which adapter of a multi-adapter run (finetune --train NAME=FILE ...)."""
    kind, path, step_dir = locate_spec(spec, which)
    if adapter is not None and kind != "finetune":
        raise TinygraftError(
            f"--adapter-name picks an adapter of a run fine-tuned with --train NAME=FILE; {str(spec)!r} is not one"
        )
    if kind == "huggingface":
        pre = load_pretrained(path, target, new_head=new_head)
        base = path if not pre.report.new_heads else None
        loaded = Loaded(
            "huggingface",
            path,
            pre.model,
            pre.tokenizer,
            hf.read_config(path),
            report=pre.report,
            pooling=pre.pooling,
            base_file=base,
        )
    elif kind == "finetune":
        loaded = _finetuned(path, step_dir, adapter)
    else:
        loaded = _pretrained_run(path, step_dir)
    loaded.model = loaded.model.to(device).eval()
    return loaded


def _checkpoint(step_dir: Path) -> checkpoint.Checkpoint:
    ckpt = checkpoint.load(step_dir, with_optimizer=False)
    if ckpt.tokenizer_path is None:
        raise TinygraftError(f"checkpoint {str(ckpt.path)!r} is incomplete: tokenizer.json is missing")
    return ckpt


def run_config(config: dict, where: Path) -> tuple[RunConfig, GPTConfig | BERTConfig]:
    saved = dict(upgrade(config))
    model_dict = saved.pop("model", None)
    if model_dict is None:
        raise TinygraftError(f"checkpoint {str(where)!r} has no model settings in its config.json")
    saved.pop("format", None)
    run = from_dict(RunConfig, saved)
    run = dataclasses.replace(run, method_settings=methods.settings_for(run.method, run.method_settings))
    return run, from_dict(type(get_preset(run.preset)), model_dict, "model")


def adapted_model(step_dir: Path, tensors: dict, build) -> tuple[nn.Module, AdapterMethod, list[str]]:
    """The model an adapter checkpoint adapts, its adapter attached (unmerged): the base read again from the
    directory base.json records (hash checked), or, for a run on a model with no file of its own, `build()` loaded
    whole from the checkpoint. A TaskModel's head has no place outside its fine-tuning run: only the backbone comes
    back when the adapter sits on one. Returns (model, method, notes)."""
    record = read_base_record(step_dir)
    config = upgrade(checkpoint.load(step_dir, with_optimizer=False).config)
    cls, _ = methods.lookup(config.get("method", "lora"))
    settings = cls.settings_from_checkpoint(step_dir)
    method = cls(settings, record["path"], record["sha256"])
    if record["path"] is None:
        if record.get("adapter_in"):
            raise TinygraftError(
                f"checkpoint {str(step_dir)!r} adapts a task model built without a base file; it "
                "can be read back only by its fine-tuning job"
            )
        model = method.attach(build())
        method.load_state_dict(model, tensors)
        return model, method, []
    model = method.attach(load_pretrained_model(locate(record["path"]), record["model"]))  # checks the base's sha256
    prefix = record.get("adapter_in") or ""
    head = sorted(k for k in tensors if prefix and not k.startswith(prefix))
    notes = [f"task head left out ({len(head)} tensors: {head[0]}, ...); it has no Hugging Face layout"] if head else []
    load_adapter_state_dict(model, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model, method, notes


def _pretrained_run(path: Path, step_dir: Path) -> Loaded:
    ckpt = checkpoint.load(step_dir, with_optimizer=False)
    config = upgrade(ckpt.config)
    adapter = is_adapter_checkpoint(ckpt.path)
    run, model_cfg, notes, unused = None, None, [], []
    # An adapter over a base file needs no settings of its own (the loop's tests write runs without them); any
    # other run is built from its settings.
    if "model" in config or not adapter or read_base_record(ckpt.path)["path"] is None:
        run, model_cfg = run_config(config, ckpt.path)
    if adapter:
        model, method, notes = adapted_model(ckpt.path, ckpt.model, lambda: build_model(model_cfg))
    else:
        method = methods.make_method(run.method, run.method_settings)
        model = method.attach(build_model(model_cfg))
        unused = method.load_state_dict(model, ckpt.model)
    tokenizer = _tokenizer(ckpt, method)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise TinygraftError(
            f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"{model.config.vocab_size}"
        )
    return Loaded(
        "pretrain",
        path,
        model,
        tokenizer,
        config,
        ckpt,
        unused=unused,
        notes=notes,
        run=run,
        model_cfg=model_cfg or model.config,
        method=method,
    )


def _tokenizer(ckpt: checkpoint.Checkpoint, method) -> TextTokenizer | None:
    """The checkpoint's tokenizer, else (an adapter run written without one) its base's, else None."""
    if ckpt.tokenizer_path is not None:
        return TextTokenizer.load(ckpt.tokenizer_path)
    base = getattr(method, "base", None)
    if base is not None and hf.has_tokenizer(locate(base)):
        return load_tokenizer(locate(base))
    return None


def build_backbone(spec: dict) -> nn.Module:
    """A GPT or BERT from a fine-tuning run's record of its backbone (family, config, pooler)."""
    if spec["family"] == "gpt":
        return GPT(from_dict(GPTConfig, spec["config"], "backbone"))
    return BERT(from_dict(BERTConfig, spec["config"], "backbone"), add_pooler=spec.get("pooler", True))


def build_head(task, backbone: nn.Module, settings, label_map, description: dict) -> nn.Module:
    """The head a run trained: the task's own, with what its description records of the choices made then (the
    pooling the checkpoint shipped, say) over the settings as given."""
    known = {f.name for f in dataclasses.fields(settings)}
    resolved = dataclasses.replace(settings, **{k: v for k, v in description.items() if k in known})
    return task.make_head(backbone, resolved, label_map, None)


def read_finetune(config: dict) -> FinetuneConfig:
    """A fine-tuning run's settings, typed (task and method settings as their dataclasses)."""
    return resolve_finetune(upgrade(config)["finetune"], None, {}, None)


def _finetuned(path: Path, step_dir: Path, adapter: str | None = None) -> Loaded:
    ckpt = _checkpoint(step_dir)
    config = upgrade(ckpt.config)
    names = config.get("adapters")
    if names is None and adapter is not None:
        raise TinygraftError(f"{str(path)!r} trained one adapter, so there is none to pick with --adapter-name; "
                             "drop it")  # fmt: skip
    if names is not None:
        return _multi(path, ckpt, config, names, adapter)
    ft = read_finetune(config)
    task = get_task(ft.task)
    method = methods.make_method(ft.method, ft.method_settings)
    if isinstance(method, AdapterMethod) and is_adapter_checkpoint(ckpt.path):
        record = read_base_record(ckpt.path)
        method = type(method)(ft.method_settings, record["path"], record["sha256"])  # attach() checks the base
    if isinstance(method, AdapterMethod) and method.base is not None:
        backbone = load_pretrained_model(locate(method.base))  # the checkpoint holds the adapter only
    else:
        backbone = build_backbone(config["backbone"])
    label_map = LabelMap.from_dict(config["labels"]) if config.get("labels") else None
    head = build_head(task, backbone, ft.task_settings, label_map, config.get("head") or {})
    model = method.attach(TaskModel(backbone, head))
    method.load_state_dict(model, ckpt.model)
    tokenizer = TextTokenizer.load(ckpt.tokenizer_path)
    return Loaded("finetune", path, model, tokenizer, config, ckpt, label_map=label_map, finetune=ft, method=method)


def _multi(path: Path, ckpt, config: dict, names: list[str], adapter: str | None) -> Loaded:
    """One adapter (and its head) of a multi-adapter run, over the base its base.json records."""
    if adapter is None:
        raise TinygraftError(f"{str(path)!r} holds {len(names)} adapters ({', '.join(names)}); choose one with "
                             "--adapter-name NAME")  # fmt: skip
    if adapter not in names:
        raise TinygraftError(f"{str(path)!r} has no adapter named {adapter!r} (its adapters: {', '.join(names)})")
    ft = read_finetune(config)
    task = get_task(ft.task)
    record = read_base_record(ckpt.path)
    inner = methods.make_method(ft.method, ft.method_settings)
    method = multi.MultiAdapter(type(inner)(ft.method_settings, record["path"], record["sha256"]), names)
    backbone = load_pretrained_model(locate(record["path"]))
    maps = {n: LabelMap.from_dict(config["labels"][n]) if config["labels"].get(n) else None for n in names}
    heads = {n: build_head(task, backbone, ft.task_settings, maps[n], config["head"][n]) for n in names}
    model = method.attach(multi.MultiTaskModel(backbone, heads))
    method.load_state_dict(model, ckpt.model)
    tokenizer = TextTokenizer.load(ckpt.tokenizer_path)
    return Loaded("finetune", path, model.task_model(adapter), tokenizer, config, ckpt, label_map=maps[adapter],
                  finetune=ft, method=method.inner, adapter=adapter)  # fmt: skip
