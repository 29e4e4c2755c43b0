"""The settings of the two training jobs, as typed dataclasses, and the one way they are resolved.

    pretrain   RunConfig (+ its model config under "model"): `--set train.lr=3e-4`, `--set model.n_layer=2`,
               `--set data.vocab_size=2048`, `--set method_settings.lora_r=4`
    finetune   FinetuneConfig: `--set train.lr=1e-4`, `--set data.max_length=64`, `--set task_settings.pooling=mean`,
               `--set method_settings.top_k=3`

Both resolve the same way (`layered`): in rising priority, the base (the saved config.json of a resumed run, or the
defaults), a `--config FILE.toml`, the command-line flags (each one a --set with a name of its own) and `--set`.
The method's settings are the method's own dataclass (train/methods/), the task's the task's (tasks/), so an
unknown key or a value of the wrong type is refused by name and a flag meant for another method or task says so.

A run started `--from` a pretrained directory or another run records that source in `source` (the shipped MiniLM
by name, anything else by its absolute path); its model settings are the source's, and only the settings in
`FROM_TUNABLE` may differ from them.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from tinygraft import tasks
from tinygraft.core import precision
from tinygraft.core.config import apply_overrides, flag_name, from_dict, setting, to_dict
from tinygraft.errors import TinygraftError
from tinygraft.models.presets import get_preset
from tinygraft.tasks.base import DataSettings
from tinygraft.train import methods

# What may differ between a checkpoint's config and a resumed run's; anything else is refused by name, because it
# would change the schedule, the data or the model and the run would no longer continue the one it resumes.
# The precision may change too: weights and optimizer state stay fp32 under bf16 autocast (core/precision.py).
RESUMABLE_CHANGES = {"train.device", "train.keep", "train.log_every", "train.compile", "train.optimizer",
                     "train.activation_checkpointing", "train.precision", "train.tensorboard"}  # fmt: skip


def _precision_setting():
    return setting("auto", precision.HELP)


def _tensorboard_setting():
    """Both jobs' switch for TensorBoard (train/board.py); metrics.jsonl is written either way."""
    return setting(False, "also write metrics.jsonl's rows as TensorBoard scalars to RUN/tensorboard/ (needs "
                          "pip install 'tinygraft[tensorboard]')")  # fmt: skip


def _fsdp_setting():
    return setting(False, "under torchrun: shard parameters, gradients and optimizer state over the processes "
                          "(FSDP2, one shard group per block) and save sharded checkpoints; DDP otherwise")  # fmt: skip


def _checkpointing_setting():
    """The setting both jobs' `train` sections share: one meaning, one help, one flag."""
    return setting(False, "recompute each block's activations in backward instead of keeping them: less memory, "
                          "about 1/3 more compute")  # fmt: skip


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps; fixes the learning-rate schedule (--steps); 0: evaluate the model as it is
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128  # tokens per sequence (at most the model's positions)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule's floor, as a fraction of lr
    warmup_steps: int = 30  # linear warmup from lr/warmup_steps to lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    weight_decay: float = 0.1  # decoupled; matrices only (no biases, norms, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    eval_every: int = 100  # steps between evaluations (and checkpoints); the last step always evaluates
    eval_batches: int = 20  # validation batches per evaluation
    log_every: int = 10  # steps between train rows in metrics.jsonl
    keep: int = 3  # step checkpoints kept (--keep); `best` is kept too
    seed: int = 1337  # model init, data order, dropout (--seed)
    compile: bool = False  # torch.compile the model
    optimizer: Literal["auto", "torch", "fused"] = "auto"  # auto: tinygraft's fused AdamW on CUDA, torch's elsewhere
    device: str = "auto"  # auto: cuda when present, else cpu (--device)
    activation_checkpointing: bool = _checkpointing_setting()  # --set train.activation_checkpointing=true
    precision: Literal["auto", "fp32", "bf16"] = _precision_setting()  # --precision
    tensorboard: bool = _tensorboard_setting()  # --set train.tensorboard=true: RUN/tensorboard/ beside metrics.jsonl
    fsdp: bool = _fsdp_setting()  # --fsdp

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every", "keep")
        for name in positive:
            if getattr(self, name) < 1:
                raise TinygraftError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise TinygraftError(f"train.steps must be at least 0, got {self.steps}")
        if not (math.isfinite(self.lr) and (self.lr > 0 or (self.lr == 0 and self.steps == 0))):
            raise TinygraftError(f"train.lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise TinygraftError("train.min_lr_ratio must be in [0, 1] and train.warmup_steps >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TinygraftError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise TinygraftError(f"train.eps must be a positive number, got {self.eps}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise TinygraftError(f"train.{name} must be a number >= 0, got {getattr(self, name)}")


@dataclass
class DataConfig:
    corpus: str | None = None  # a text file, a directory of *.txt/*.md/*.jsonl, or None for pydoc_data.topics
    text_field: str = "text"  # the field holding text in JSONL files, the column in Parquet / saved datasets
    tokenizer: str | None = None  # an existing tokenizer.json / directory; None trains one on the corpus
    vocab_size: int = 4096  # size of a tokenizer trained here
    val_fraction: float = 0.1  # share of the tokens held out for validation
    mask_prob: float = 0.15  # BERT presets: share of tokens chosen for masked-LM


@dataclass
class DistillSettings:
    """Distillation (section `distill`, `tinygraft distill`; train/distill.py): the teacher, the student and the
    weights of the loss's terms. No teacher: a plain run."""

    teacher: str | None = setting(None, "the teacher: a fine-tuned run (distil its task) or a language model")
    student: str | None = setting(None, "the student: a preset (the teacher's tokenizer), a directory or a run")
    student_from_teacher: str | None = setting(
        None, "build the student from the teacher's blocks: 0-based numbers like 0,2,4, or every-other"
    )
    kd_weight: float = setting(0.5, "weight of T^2 * D(teacher || student) over the soft labels")
    task_weight: float = setting(0.5, "weight of the job's own loss (labels, next or masked tokens)")
    hidden_weight: float = setting(0.0, "weight of the hidden-state loss over --layer-map")
    attention_weight: float = setting(0.0, "weight of MiniLM's last-layer attention and value relations")
    divergence: Literal["forward", "reverse", "jsd"] = setting("forward", "D: forward KL, reverse KL or JSD(beta)")
    jsd_beta: float = setting(0.5, "JSD's beta: m = beta * teacher + (1 - beta) * student")
    temperature: float | None = setting(
        None, "softmax temperature T of both models (default: 1 over a vocabulary, 2 over a task's classes)"
    )
    layer_map: str | None = setting(
        None, "TEACHER:STUDENT layer pairs, 0 = the embeddings, i = block i (default: uniform, last to last)"
    )
    hidden_loss: Literal["mse", "cosine"] = setting(
        "cosine",
        "the hidden-state loss: 1 - cosine, or MSE (TinyBERT's; on a GPT's unnormalised residual stream it "
        "outweighed the rest and the student ended worse, README)",
    )
    projection: bool = setting(True, "learn a linear map to the teacher's width when the widths differ")
    relation_heads: int | None = setting(None, "relation heads of the attention loss (default: the student's heads)")

    def temperature_for(self, vocabulary: bool) -> float:
        """T as given, else 1 for a language model's vocabulary (measured in README's GPT demo: at T = 2 the student
        ends 0.6 nats worse) and 2 for a task's class logits (Hinton et al. 2015; DistilBERT)."""
        if self.temperature is not None:
            return self.temperature
        return 1.0 if vocabulary else 2.0

    def __post_init__(self):
        for name in ("kd_weight", "task_weight", "hidden_weight", "attention_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise TinygraftError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.teacher is not None and not any(
            getattr(self, n) > 0 for n in ("kd_weight", "task_weight", "hidden_weight", "attention_weight")
        ):
            raise TinygraftError("every distillation weight is 0, so nothing would train; give one a weight")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise TinygraftError(f"--temperature must be a positive number, got {self.temperature}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise TinygraftError(f"--jsd-beta must be in (0, 1), got {self.jsd_beta}")
        if self.relation_heads is not None and self.relation_heads < 1:
            raise TinygraftError(f"distill.relation_heads must be at least 1, got {self.relation_heads}")


def _watch_setting():
    """The setting both jobs share: one meaning, one help, one flag (train/continual.py)."""
    help_ = ("a text to watch for forgetting at every evaluation (its held-out split: the LM loss, or the features' "
             "drift for a model without an LM head); repeat for several")  # fmt: skip
    return setting(None, help_, repeat=True)


@dataclass
class ContinualSettings:
    """Continued pre-training that keeps what the model knew (section `continual`; train/continual.py): replay of
    the old corpus, EWC (train/ewc.py), and texts watched for forgetting."""

    replay: str | None = setting(None, "the old domain's corpus: --replay-ratio of every batch's rows come from its "
                                       "training split")  # fmt: skip
    replay_ratio: float = setting(0.25, "the share of every batch's rows drawn from --replay")
    ewc: float = setting(0.0, "EWC's lambda: lambda/2 * sum F (theta - theta*)^2 over the starting weights (0: off)")
    ewc_data: str | None = setting(None, "the old corpus EWC's Fisher is computed on (default: the --from run's own)")
    ewc_samples: int = setting(256, "sequences EWC's Fisher averages over")
    watch: str | list[str] | None = _watch_setting()

    def __post_init__(self):
        if not 0 < self.replay_ratio < 1:
            raise TinygraftError(f"--replay-ratio must lie between 0 and 1 (exclusive), got {self.replay_ratio}")
        if not (math.isfinite(self.ewc) and self.ewc >= 0):
            raise TinygraftError(f"--ewc must be a number >= 0, got {self.ewc}")
        if self.ewc_samples < 1:
            raise TinygraftError(f"--ewc-samples must be at least 1, got {self.ewc_samples}")


@dataclass
class RunConfig:
    task: str = "pretrain"
    preset: str = "gpt-tiny"  # a name from tinygraft.models.presets.PRESETS (--preset)
    method: str = "full"  # full or lora (--method)
    source: str | None = None  # --from: the pretrained directory or tinygraft run the weights came from
    new_head: bool = False  # --new-head: the source (a BERT without a masked-LM head) got a fresh one
    method_settings: Any = field(default_factory=dict)  # the method's Settings (LoRA's r, alpha, targets, ...)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillSettings = field(default_factory=DistillSettings)  # a teacher: `tinygraft distill`
    continual: ContinualSettings = field(default_factory=ContinualSettings)  # replay, EWC, watched texts


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def refuse_changes(saved: dict, wanted: dict, allowed: set[str] = RESUMABLE_CHANGES) -> None:
    """On resume: the first setting that differs from the checkpoint's and may not change is an error naming it."""
    a, b = flatten(saved), flatten(wanted)
    for key in sorted(set(a) | set(b)):
        if key in allowed or a.get(key) == b.get(key):
            continue
        raise TinygraftError(
            f"--resume keeps the run's settings, but {key} would change from {a.get(key)!r} to {b.get(key)!r}; "
            "drop that option or start a new run with another --out"
        )


# Per-preset defaults, applied over the dataclass defaults and under --config / flags / --set. gpt-tiny's are chosen
# so the README's first command pre-trains and samples in well under 5 minutes on 2 CPU cores (see README).
PRESET_DEFAULTS: dict[str, dict] = {
    "gpt-tiny": {"train": {}, "data": {"vocab_size": 4096}},
    "bert-tiny": {"train": {"lr": 1e-3, "warmup_steps": 30}, "data": {"vocab_size": 4096}},
    "gpt2": {
        "train": {
            "steps": 5000,
            "batch_size": 8,
            "grad_accum": 4,
            "seq_len": 1024,
            "lr": 6e-4,
            "warmup_steps": 200,
            "eval_every": 250,
        },
        "data": {"vocab_size": 50257},
    },
    "bert-base": {
        "train": {
            "steps": 5000,
            "batch_size": 32,
            "seq_len": 128,
            "lr": 1e-4,
            "warmup_steps": 500,
            "eval_every": 250,
            "weight_decay": 0.01,
            "beta2": 0.999,
        },
        "data": {"vocab_size": 30522},
    },
}


# Model settings a run `--from` a checkpoint may change: they alter no weight's shape or meaning.
FROM_TUNABLE = {"dropout", "attention_dropout"}


def requested(key: str, file: dict | None, flags: dict, sets: list[str] | None):
    """A top-level setting ("preset", "method", "task") as the user gave it -- --set key=, a flag, or the --config
    file -- in `layered`'s priority; None when not given."""
    named = [s.split("=", 1)[1].strip() for s in sets or [] if s.split("=", 1)[0].strip() == key]
    return named[0] if named else flags.get(key) if flags.get(key) is not None else (file or {}).get(key)


def merge(base: dict, top: dict) -> dict:
    """Nested dict update: tables merge key by key, other values replace."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unflatten(flags: dict) -> dict:
    """{"train.steps": 200, "method": "lora"} -> {"train": {"steps": 200}, "method": "lora"}: flags as a table."""
    out: dict = {}
    for key, value in flags.items():
        section, _, name = key.rpartition(".")
        if section:
            out.setdefault(section, {})[name] = value
        else:
            out[name] = value
    return out


NAMES = ("preset", "method", "task")  # top-level names a --set may change; they choose the settings' classes


def layered(base: dict, file: dict | None, flags: dict, sets: list[str] | None) -> tuple[dict, list[str]]:
    """(merged dict, the --set items still to apply): base < --config file < flags < --set of the NAMES. A section
    of settings that belongs to a method (or task) other than the one chosen is dropped from the base."""
    merged = merge(merge(base, file or {}), unflatten(flags))
    rest = []
    for item in sets or []:
        if "=" not in item:
            raise TinygraftError(f"override {item!r} must look like key=value")
        key, value = (x.strip() for x in item.split("=", 1))
        if key in NAMES:
            merged[key] = value
        else:
            rest.append(item)
    for name, section in (("method", "method_settings"), ("task", "task_settings")):
        if name in base and merged.get(name) != base.get(name):
            merged[section] = merge({}, (file or {}).get(section, {}) or {})
            merged[section].update(unflatten(flags).get(section, {}))
    return merged, rest


def resolve(base: dict | None, file: dict | None, flags: dict, sets: list[str] | None):
    """A pre-training run's (RunConfig, model config) from, in rising priority: `base` (a saved config.json, or
    None for the defaults of the preset), a --config file, command-line flags ({"train.steps": 200, ...}) and --set.
    """
    preset = requested("preset", file, {}, sets) or flags.get("preset") or (file or {}).get("preset")
    preset = preset or (base or {}).get("preset") or RunConfig.preset
    if not isinstance(preset, str):
        raise TinygraftError(f"preset must be a string, got {preset!r}")
    model_cfg = get_preset(preset)  # unknown names are refused here, naming the known ones
    if base is None:
        base = merge({"preset": preset, "model": to_dict(model_cfg)}, PRESET_DEFAULTS.get(preset, {}))
    merged, sets = layered(base, file, flags, sets)
    model_dict = merged.pop("model", {}) or {}
    run = from_dict(RunConfig, merged)
    run = dataclasses.replace(run, method_settings=methods.settings_for(run.method, run.method_settings, "pretrain"))
    model_cfg = from_dict(type(model_cfg), merge(to_dict(model_cfg), model_dict), "model")
    run = apply_overrides(run, [s for s in sets if not s.strip().startswith("model.")])
    model_cfg = apply_overrides(model_cfg, [s.strip()[len("model.") :] for s in sets if s.strip().startswith("model.")])
    return run, model_cfg


def full_dict(run: RunConfig, model_cfg) -> dict:
    return {**to_dict(run), "model": to_dict(model_cfg)}


def explicit_model_keys(file: dict | None, sets: list[str] | None) -> set[str]:
    """Model fields the user set on purpose (so a tokenizer may not silently replace them)."""
    keys = set((file or {}).get("model", {}) or {})
    return keys | {s.split("=", 1)[0].strip()[len("model.") :] for s in sets or [] if s.strip().startswith("model.")}


# ----------------------------------------------------------------------------------------------------- finetune
@dataclass
class FinetuneTrain:
    """The schedule of a fine-tuning run (section `train`): BERT's and `transformers`' usual one."""

    epochs: int = setting(3, "passes over the training data")
    steps: int | None = setting(None, "optimizer steps (overrides --epochs)")
    batch_size: int = setting(32, "examples per batch")
    eval_batch_size: int = setting(64, "examples per validation batch")
    lr: float | None = setting(None, "peak learning rate (default: the method's own)")
    seed: int = setting(0, "head init, data order and dropout")
    warmup: float = setting(0.1, "warmup as a fraction of the steps (then linear decay to 0)")
    weight_decay: float = setting(0.01, "decoupled weight decay of the matrices")
    eval_every: int | None = setting(None, "steps between evaluations (default: one epoch)")
    log_every: int | None = setting(None, "steps between logged train rows (default: 10, or --eval-every if fewer)")
    patience: int | None = setting(None, "stop after this many evaluations without a better validation metric")
    keep: int = setting(1, "step checkpoints kept besides the best")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    precision: Literal["auto", "fp32", "bf16"] = _precision_setting()
    compile: bool = setting(False, "torch.compile the model")
    optimizer: Literal["auto", "torch", "fused"] = setting(
        "auto", "AdamW: tinygraft's fused kernel on CUDA and torch's fused one elsewhere (auto), torch's, or ours"
    )
    activation_checkpointing: bool = _checkpointing_setting()
    tensorboard: bool = _tensorboard_setting()
    fsdp: bool = _fsdp_setting()

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "keep"):
            if getattr(self, name) < 1:
                raise TinygraftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every", "log_every", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TinygraftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise TinygraftError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise TinygraftError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TinygraftError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")


@dataclass
class FinetuneContinual:
    """Fine-tuning's part of adapting without forgetting (section `continual`): task-adaptive pre-training first
    (train/adapt_first.py) and texts watched for forgetting (train/continual.py)."""

    adapt_first: int = setting(0, "steps of the backbone's own LM objective on the task's training text before "
                                  "fine-tuning (task-adaptive pre-training; 0: none)")  # fmt: skip
    adapt_lr: float = setting(1e-4, "--adapt-first's peak learning rate (continued pre-training's)")
    watch: str | list[str] | None = _watch_setting()

    def __post_init__(self):
        if self.adapt_first < 0:
            raise TinygraftError(f"--adapt-first must be a number of steps >= 0, got {self.adapt_first}")
        if not (math.isfinite(self.adapt_lr) and self.adapt_lr > 0):
            raise TinygraftError(f"--adapt-lr must be a positive number, got {self.adapt_lr}")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: where the backbone comes from, the task and its data, the method, the schedule."""

    source: str = setting("minilm", "HF model directory, 'minilm' (default), or a tinygraft run", flag="from")
    task: str = setting("classify", "the task (tinygraft/tasks/): classify, tokens, qa, similarity, instruct")
    method: str = setting(
        "full",
        "full, linear-probe, top-k (or top-K: top-2), gradual-unfreeze, lora, zero-shot, few-shot-K (train/methods/)",
    )
    data: DataSettings = field(default_factory=DataSettings)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    task_settings: Any = field(default_factory=dict)  # the task's Settings
    method_settings: Any = field(default_factory=dict)  # the method's Settings
    distill: DistillSettings = field(default_factory=DistillSettings)  # a teacher: `tinygraft distill`
    continual: FinetuneContinual = field(default_factory=FinetuneContinual)  # --adapt-first, watched texts


def resolve_finetune(base: dict | None, file: dict | None, flags: dict, sets: list[str] | None) -> FinetuneConfig:
    """A fine-tuning run's config from, in rising priority: `base` (a resumed run's saved config, or None for the
    defaults), a --config file, the flags ({"train.lr": 1e-3, "task_settings.pooling": "mean", ...}) and --set."""
    merged, sets = layered(base or {}, file, flags, sets)
    cfg = from_dict(FinetuneConfig, merged)
    cfg = dataclasses.replace(
        cfg,
        task_settings=tasks.settings_for(cfg.task, cfg.task_settings),
        method_settings=methods.settings_for(cfg.method, cfg.method_settings, "finetune"),
    )
    return apply_overrides(cfg, sets)


def finetune_flag(cfg: FinetuneConfig, key: str) -> str:
    """The command-line flag of a dotted setting ("train.lr" -> "--lr"), or "--set KEY" for one without a flag."""
    owner, name = cfg, key
    if "." in key:
        section, name = key.split(".", 1)
        owner = getattr(cfg, section, None)
    fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
    return f"--{flag_name(fields[name])}" if name in fields else f"--set {key}"
