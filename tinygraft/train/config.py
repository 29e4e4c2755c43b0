"""The settings of a training run: typed dataclasses with commented defaults.

A run's `config.json` is `RunConfig` plus its model config under "model"; `--set section.key=value` reaches any
field (`--set train.lr=3e-4`, `--set model.n_layer=2`, `--set data.vocab_size=2048`).

A run started `--from` a pretrained directory or another run records that source (an absolute path) in `source`;
its model settings are the source's, and only the settings in `FROM_TUNABLE` may differ from them.
"""

from dataclasses import dataclass, field
from typing import Literal

from tinygraft.errors import TinygraftError

# What may differ between a checkpoint's config and a resumed run's; anything else is refused by name, because it
# would change the schedule, the data or the model and the run would no longer continue the one it resumes.
RESUMABLE_CHANGES = {"train.device", "train.keep", "train.log_every", "train.compile", "train.optimizer"}


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps; fixes the learning-rate schedule (--steps)
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

    def __post_init__(self):
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every", "keep")
        for name in positive:
            if getattr(self, name) < 1:
                raise TinygraftError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise TinygraftError("train.lr must be positive, train.min_lr_ratio in [0, 1], train.warmup_steps >= 0")


@dataclass
class DataConfig:
    corpus: str | None = None  # a text file, a directory of *.txt/*.md/*.jsonl, or None for pydoc_data.topics
    text_field: str = "text"  # the field holding text in JSONL files
    tokenizer: str | None = None  # an existing tokenizer.json / directory; None trains one on the corpus
    vocab_size: int = 4096  # size of a tokenizer trained here
    val_fraction: float = 0.1  # share of the tokens held out for validation
    mask_prob: float = 0.15  # BERT presets: share of tokens chosen for masked-LM


@dataclass
class RunConfig:
    task: str = "pretrain"
    preset: str = "gpt-tiny"  # a name from tinygraft.models.presets.PRESETS (--preset)
    method: str = "full"  # full or lora (--method)
    source: str | None = None  # --from: the pretrained directory or tinygraft run the weights came from
    new_head: bool = False  # --new-head: the source (a BERT without a masked-LM head) got a fresh one
    method_settings: dict = field(default_factory=dict)  # the method's describe(): LoRA's r, alpha, targets, base
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def refuse_changes(saved: dict, wanted: dict) -> None:
    """On resume: the first setting that differs from the checkpoint's and may not change is an error naming it."""
    a, b = flatten(saved), flatten(wanted)
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
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
        "train": {"steps": 5000, "batch_size": 8, "grad_accum": 4, "seq_len": 1024, "lr": 6e-4, "warmup_steps": 200,
                  "eval_every": 250},
        "data": {"vocab_size": 50257},
    },
    "bert-base": {
        "train": {"steps": 5000, "batch_size": 32, "seq_len": 128, "lr": 1e-4, "warmup_steps": 500, "eval_every": 250,
                  "weight_decay": 0.01, "beta2": 0.999},
        "data": {"vocab_size": 30522},
    },
}


# Model settings a run `--from` a checkpoint may change: they alter no weight's shape or meaning.
FROM_TUNABLE = {"dropout", "attention_dropout"}
# Training defaults of a run `--from` pretrained weights (under --config / flags / --set): a continued pre-training
# rate, not a from-scratch one, and a higher one for LoRA's freshly initialised adapters (as the LoRA paper does).
FROM_LR = {"full": 1e-4, "lora": 1e-3}


def requested(key: str, file: dict | None, flags: dict, sets: list[str] | None):
    """A top-level setting ("preset", "method") as the user gave it -- --set key=, a flag, or the --config file --
    in resolve()'s priority; None when not given."""
    named = [s.split("=", 1)[1].strip() for s in sets or [] if s.split("=", 1)[0].strip() == key]
    return named[0] if named else flags.get(key) if flags.get(key) is not None else (file or {}).get(key)


def merge(base: dict, top: dict) -> dict:
    """Nested dict update: tables merge key by key, other values replace."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(base: dict | None, file: dict | None, flags: dict, sets: list[str] | None):
    """The run's (RunConfig, model config, full dict) from, in rising priority: `base` (a saved config.json, or
    None for the defaults of the preset), a --config file, command-line flags ({"train.steps": 200, ...}) and --set.
    """
    from tinygraft.core.config import apply_overrides, from_dict, to_dict
    from tinygraft.models.presets import get_preset

    file = dict(file or {})
    for key, value in flags.items():  # flags are --set with a name of their own
        section, name = key.split(".") if "." in key else (None, key)
        if section is None:
            file[name] = value
        else:
            file.setdefault(section, {})[name] = value
    sets = list(sets or [])
    preset = next((s.split("=", 1)[1].strip() for s in sets if s.split("=", 1)[0].strip() == "preset"), None)
    preset = preset or file.get("preset") or (base or {}).get("preset") or RunConfig.preset
    if not isinstance(preset, str):
        raise TinygraftError(f"preset must be a string, got {preset!r}")
    model_cfg = get_preset(preset)  # unknown names are refused here, naming the known ones
    if base is None:
        base = merge({"preset": preset, "model": to_dict(model_cfg)}, PRESET_DEFAULTS.get(preset, {}))
    merged = merge(base, file)
    model_dict = merged.pop("model", {}) or {}
    run = from_dict(RunConfig, merged)
    model_cfg = from_dict(type(model_cfg), merge(to_dict(model_cfg), model_dict), "model")
    run = apply_overrides(run, [s for s in sets if not s.strip().startswith("model.")])
    model_cfg = apply_overrides(model_cfg, [s.strip()[len("model.") :] for s in sets if s.strip().startswith("model.")])
    return run, model_cfg


def full_dict(run: RunConfig, model_cfg) -> dict:
    from tinygraft.core.config import to_dict

    return {**to_dict(run), "model": to_dict(model_cfg)}


def explicit_model_keys(file: dict | None, sets: list[str] | None) -> set[str]:
    """Model fields the user set on purpose (so a tokenizer may not silently replace them)."""
    keys = set((file or {}).get("model", {}) or {})
    return keys | {s.split("=", 1)[0].strip()[len("model.") :] for s in sets or [] if s.strip().startswith("model.")}
