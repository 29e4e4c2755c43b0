"""`tinygraft finetune`: a pretrained backbone + a task head, trained by a method, on labeled data, in the one loop.

    --from (HF dir | minilm | a tinygraft run) -> backbone + tokenizer (+ the checkpoint's sentence pooling)
    --train / --val (TSV, CSV, JSONL, CoNLL, SQuAD JSON; the stdlib docstring demo when --train is omitted)
        -> examples -> label map (from the training file) -> features -> LabeledBatcher (seeded, exact resume)
    make_head(task) -> TaskModel(backbone, head);  make_method(--method) -> which parameters train, when, at what lr
    Job(model, method, batcher, loss, evaluate = the task's validation metrics) -> train/loop.py's `train`

The schedule is fine-tuning's usual one (BERT, `transformers`' Trainer): linear warmup over `--warmup` (10%) of
the steps, then linear decay to zero; AdamW with decoupled weight decay 0.01, betas (0.9, 0.999), grad clip 1.
`--steps` defaults to `--epochs` passes over the training set; the model is evaluated once per epoch (or every
`--eval-every` steps) and the best checkpoint on the task's primary metric is the one results.json reports.

The run's config.json (in the run directory and in every checkpoint) holds everything needed to rebuild the model
without the base: the backbone's architecture, the head's description, the label map and the method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinygraft.core.jsonfile import read_json
from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import TaskModel, make_head
from tinygraft.train.config import TrainConfig, flatten
from tinygraft.train.finetune_methods import (
    BlockMethod,
    GradualUnfreeze,
    default_lr,
    make_method,
    trainable_summary,
    units,
)
from tinygraft.train.metrics import TaskScorer, primary_metric
from tinygraft.train.run_dir import RunDir

TASKS = ("classify", "tokens", "qa", "similarity", "instruct")
# Column defaults per task (--text-col / --text-pair-col / --label-col override them).
COLUMNS = {
    "classify": ("text", None, "label"),
    "tokens": ("tokens", None, "tags"),
    "qa": ("question", "context", "answer"),
    "similarity": ("sentence1", "sentence2", "score"),
    "instruct": ("prompt", "completion", None),
}


@dataclass
class FinetuneArgs:
    out: str
    from_: str = "minilm"  # HF directory, 'minilm', or a tinygraft run (pre-trained or fine-tuned)
    task: str = "classify"  # classify | tokens | qa | similarity | instruct
    train: str | None = None  # None: the stdlib docstring demo (classify)
    val: str | None = None  # None for SQuAD JSON: the same file split by article
    method: str = "full"  # full | linear-probe | top-k | top-K | gradual-unfreeze | lora
    epochs: int = 3
    steps: int | None = None  # overrides epochs; fixes the schedule
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128  # tokens per example, special tokens included (QA: per window)
    lr: float | None = None  # None: the method's default (finetune_methods.DEFAULT_LR)
    seed: int = 0  # head init, data order, dropout
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.01
    eval_every: int | None = None  # None: once per epoch (and at the last step)
    patience: int | None = None  # early stop after this many evaluations without improvement
    keep: int = 1
    device: str = "auto"
    compile: bool = False
    optimizer: str = "auto"
    max_train: int | None = None  # use a fixed random subset (Random(0), the same for every seed and method)
    max_val: int | None = None  # a fixed random subset too (the same Random(0) draw as max_train)
    # data columns
    text_col: str | None = None
    text_pair_col: str | None = None
    label_col: str | None = None
    answer_start_col: str | None = None  # QA tables
    quote_none: bool = False  # read quote characters as text (STS-B)
    problem: str = "single_label"  # classify: single_label | multi_label | regression
    # head
    pooling: str | None = None  # None: the checkpoint's sentence pooling, else the head's default
    dropout: float = 0.1
    similarity_loss: str = "cosine"  # cosine | contrastive
    max_score: float = 5.0
    doc_stride: int | None = None  # QA window overlap; None: min(128, max_length // 4)
    # method settings
    top_k: int | None = None
    feature_cache: bool = True  # linear-probe: pooled features computed once per example, then read from memory
    unfreeze_every: int | None = None  # None: one epoch, or steps / units when that is shorter
    layer_lr_decay: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str | None = None
    lora_rslora: bool = False
    overwrite: bool = False
    resume: bool = False  # continue the run in `out` from its latest checkpoint, with its own saved settings
    stop_at: int | None = None  # stop after this step (a checkpoint to resume from later)


# How a run is invoked, not what it trains: the only settings a resumed run may change (and not saved in its config).
INVOCATION = ("out", "overwrite", "resume", "stop_at", "device")


def run_settings(a: FinetuneArgs) -> dict:
    """What config.json saves of the arguments (everything but the invocation): what --resume restores."""
    return {k: v for k, v in dataclasses.asdict(a).items() if k not in INVOCATION}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def subset(items: list, n: int | None) -> list:
    """A fixed random subset (Random(0)), in shuffled order: the same for every seed, method and process."""
    if n is None or n >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    return [items[i] for i in order[:n]]


# ------------------------------------------------------------------------------------------------- the backbone
@dataclass
class Base:
    backbone: torch.nn.Module
    tokenizer: object
    source: str
    pooling: str | None  # the checkpoint's sentence-transformers pooling, as a head pooling name
    loaded: object | None = None  # a fine-tuned run's Finetuned (its head may be reused)


def sentence_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers directory ships, or None when it ships none."""
    from tinygraft.models.pretrained import read_pooling

    if not ((path / "modules.json").is_file() or (path / "1_Pooling" / "config.json").is_file()):
        return None
    modes = read_pooling(path).modes
    named = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}
    if len(modes) != 1 or modes[0] not in named:
        raise TinygraftError(f"'{path}' pools with {'+'.join(modes)}, which no task head implements")
    return named[modes[0]]


def load_base(spec: str) -> Base:
    from tinygraft.models import hf
    from tinygraft.models.pretrained import load_pretrained, resolve_pretrained

    path = resolve_pretrained(spec)
    if not path.exists():
        raise TinygraftError(f"--from {spec!r} is neither a directory nor a known model name (try 'minilm')")
    if hf.is_hf_dir(path):
        pre = load_pretrained(path)
        return Base(pre.model, pre.tokenizer, str(path), sentence_pooling(path))
    cfg = _run_config(path)
    if cfg.get("kind") == "finetune":
        from tinygraft.train.predict import load_finetuned

        ft = load_finetuned(path, torch.device("cpu"))
        return Base(ft.model.backbone, ft.tokenizer, str(path), None, ft)
    from tinygraft.train.sources import from_run

    source = from_run(path)  # a LoRA pre-training run comes with its adapter merged
    return Base(source.model, source.tokenizer, str(path), None)


def _run_config(path: Path) -> dict:
    from tinygraft.core import checkpoint

    try:
        return checkpoint.load(path, with_optimizer=False).config
    except TinygraftError as e:
        raise TinygraftError(f"--from '{path}' is not a Hugging Face directory nor a readable run ({e})") from None


def backbone_spec(model: TaskModel) -> dict:
    from tinygraft.core.config import to_dict

    bb = model.backbone
    return {"family": model.family, "config": to_dict(bb.config), "pooler": getattr(bb, "pooler", None) is not None}


# ---------------------------------------------------------------------------------------------------- the data
@dataclass
class TaskData:
    train: list[dict]  # features
    val: list[dict]
    label_map: L.LabelMap | None
    scorer_kwargs: dict  # what TaskScorer needs beyond the task (sentences / examples / features of val)
    n_train: int
    n_val: int


def columns(a: FinetuneArgs) -> tuple[str | None, str | None, str | None]:
    d = COLUMNS[a.task]
    return a.text_col or d[0], a.text_pair_col or d[1], a.label_col or d[2]


def read_examples(a: FinetuneArgs, path: str, labeled: bool = True):
    """A file's examples for the task (labels read when `labeled`)."""
    text, pair, label = columns(a)
    if a.task == "tokens":
        from tinygraft.data.ner import read_tagged

        return read_tagged(path, text, label if labeled else None)
    if a.task == "qa":
        from tinygraft.data.qa import read_qa_table, read_squad

        if Path(path).suffix == ".json":  # SQuAD; one file for both sides is split by article
            by_article = path == a.train and (a.val is None or Path(a.val) == Path(a.train))
            return read_squad(path, "train" if by_article else None)
        return read_qa_table(path, text, pair, label if labeled else None, a.answer_start_col, None, a.quote_none)
    if a.task == "instruct":
        return L.read_labeled(path, text, None, pair, quote_none=a.quote_none)
    problem = "regression" if a.task == "similarity" else a.problem
    return L.read_labeled(path, text, label if labeled else None, pair if a.task == "similarity" else a.text_pair_col,
                          problem, a.quote_none)  # fmt: skip


def read_val(a: FinetuneArgs, train_path: str):
    if a.task == "qa" and Path(train_path).suffix == ".json" and (a.val is None or Path(a.val) == Path(train_path)):
        from tinygraft.data.qa import read_squad

        return read_squad(train_path, "val")  # the same file, the other articles
    if a.val is None:
        raise TinygraftError(f"the {a.task} task needs --val FILE (validation data) besides --train")
    return read_examples(a, a.val)


def encode(a: FinetuneArgs, examples, tokenizer, label_map, source: str) -> list[dict]:
    if a.task == "tokens":
        from tinygraft.data.ner import encode_tagged

        return encode_tagged(examples, tokenizer, a.max_length, label_map, source)
    if a.task == "qa":
        from tinygraft.data.qa import make_qa_features

        stride = a.doc_stride if a.doc_stride is not None else min(128, a.max_length // 4)
        return make_qa_features(examples, tokenizer, a.max_length, stride, min(64, a.max_length // 2))
    if a.task == "similarity":
        return L.encode_pairs(examples, tokenizer, a.max_length)
    if a.task == "instruct":
        return L.encode_prompt_completions(examples, tokenizer, a.max_length)
    return L.encode_classification(examples, tokenizer, a.max_length, label_map, a.problem, source)


def build_label_map(a: FinetuneArgs, train_examples, loaded_head=None, loaded_map=None):
    if a.task == "tokens":
        from tinygraft.data.ner import tag_label_map

        built = tag_label_map(train_examples)
    elif a.task == "classify" and a.problem != "regression":
        built = L.LabelMap.build(ex.label for ex in train_examples)
    else:
        return None
    if loaded_head is not None:  # fine-tuning a fine-tuned run further: its head decides the labels
        L.check_label_count(built, loaded_head.num_labels, "the head loaded from --from")
        return loaded_map or built
    return built


def prepare_data(a: FinetuneArgs, tokenizer, loaded=None) -> TaskData:
    train_path = a.train
    if train_path is None:
        if a.task != "classify":
            raise TinygraftError(f"the {a.task} task needs --train FILE; only classify has a built-in demo")
        from tinygraft.data.demo import write_demo_task

        train_path, val_path = write_demo_task(Path(a.out) / "demo_data")
        a.train, a.val, a.text_col, a.label_col = str(train_path), str(val_path), "text", "label"
        say(f"no --train given: the stdlib docstring demo (which package a docstring comes from), in {train_path}")
    train_ex = subset(read_examples(a, a.train), a.max_train)
    val_ex = read_val(a, a.train)
    val_ex = subset(val_ex, a.max_val)  # random, not the first N: a file sorted by genre or date would mislead
    if not train_ex:
        raise TinygraftError(f"training file '{a.train}' holds no examples")
    if not val_ex:
        raise TinygraftError(f"validation file '{a.val}' holds no examples")
    same_task = loaded is not None and loaded.config.get("task") == a.task
    label_map = build_label_map(a, train_ex, loaded.model.head if same_task else None,
                                loaded.label_map if same_task else None)  # fmt: skip
    train = encode(a, train_ex, tokenizer, label_map, str(a.train))
    val = encode(a, val_ex, tokenizer, label_map, str(a.val or a.train))
    extra = {}
    if a.task == "tokens":
        extra = {"label_map": label_map, "sentences": val_ex}
    elif a.task == "qa":
        extra = {"examples": val_ex, "features": val}
    return TaskData(train, val, label_map, extra, len(train_ex), len(val_ex))


# --------------------------------------------------------------------------------------------------- the job
def make_evaluate(a: FinetuneArgs, data: TaskData, pad_id: int, timer: dict):
    from tinygraft.train.loop import to_device

    problem = a.problem if a.task == "classify" else "single_label"

    def evaluate(model) -> dict:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        scorer = TaskScorer(a.task, problem, **data.scorer_kwargs)
        for batch in L.eval_batches(data.val, a.eval_batch_size, pad_id):
            batch = to_device(batch, device)
            outputs, loss = model(batch)
            scorer.add(outputs, batch, loss)
        timer["eval_seconds"] += time.perf_counter() - t0
        return scorer.result()

    return evaluate


def task_loss(model, batch):
    return model(batch)[1]


def method_settings(a: FinetuneArgs, default_every: int) -> dict:
    return {
        "k": a.top_k,
        "every": a.unfreeze_every or default_every,
        "layer_lr_decay": a.layer_lr_decay,
        "cache_features": a.feature_cache,
        "r": a.lora_r,
        "alpha": a.lora_alpha,
        "dropout": a.lora_dropout,
        "targets": a.lora_targets,
        "use_rslora": a.lora_rslora or None,
    }


def check_args(a: FinetuneArgs) -> None:
    if a.task not in TASKS:
        raise TinygraftError(f"unknown task {a.task!r} (known: {', '.join(TASKS)})")
    for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "keep"):
        if getattr(a, name) < 1:
            raise TinygraftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("steps", "eval_every", "patience", "max_train", "max_val", "stop_at"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise TinygraftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if not 0.0 <= a.warmup < 1.0:
        raise TinygraftError(f"--warmup is a fraction of the steps in [0, 1), got {a.warmup}")
    if a.lr is not None and a.lr <= 0:
        raise TinygraftError(f"--lr must be positive, got {a.lr}")


def finetune(a: FinetuneArgs):
    from tinygraft.kernels.backend import describe
    from tinygraft.train.loop import Job, resolve_device, seed_everything, train

    run_dir = RunDir(a.out)
    run_dir.check(resume=a.resume, overwrite=a.overwrite)
    resume = None
    if a.resume:
        a, resume = resume_args(a, run_dir)
    check_args(a)
    make_method(a.method, **method_settings(a, 1))  # an unknown method fails before any loading
    resolve_device(a.device)
    seed_everything(a.seed)
    base = load_base(a.from_)
    tokenizer = base.tokenizer
    if tokenizer is None:
        raise TinygraftError(f"--from '{base.source}' has no tokenizer")
    positions = getattr(base.backbone.config, "max_position_embeddings", None) or base.backbone.config.block_size
    if a.max_length > positions:
        say(f"--max-length {a.max_length} is above the model's {positions} positions; using {positions}")
        a.max_length = positions
    data = prepare_data(a, tokenizer, base.loaded)

    loaded = base.loaded if base.loaded is not None and base.loaded.config.get("task") == a.task else None
    if loaded is not None:
        head = loaded.model.head
    else:
        num_labels = len(data.label_map) if data.label_map is not None else (1 if a.problem == "regression" else None)
        head = make_head(a.task, base.backbone, num_labels=num_labels, pooling=a.pooling or base.pooling,
                         problem=a.problem, loss=a.similarity_loss, max_score=a.max_score,
                         dropout=a.dropout)  # fmt: skip
    model = TaskModel(base.backbone, head)
    model.train()
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    batcher = L.LabeledBatcher(data.train, a.batch_size, pad_id, seed=a.seed)
    steps = a.steps or a.epochs * batcher.steps_per_epoch
    # gradual unfreezing: one unit per epoch (ULMFiT) when the budget has an epoch for each, else spread so that
    # every unit trains before the end (a one-epoch run would otherwise never leave the head)
    every = min(batcher.steps_per_epoch, max(1, steps // len(units(model))))
    method = make_method(a.method, **method_settings(a, every))
    lr = a.lr if a.lr is not None else default_lr(a.method)
    eval_every = a.eval_every or batcher.steps_per_epoch
    cfg = TrainConfig(
        steps=steps, batch_size=a.batch_size, seq_len=a.max_length, lr=lr, min_lr_ratio=0.0,
        warmup_steps=int(a.warmup * steps), schedule="linear", weight_decay=a.weight_decay, beta1=0.9, beta2=0.999,
        eps=1e-8, grad_clip=1.0, eval_every=eval_every, eval_batches=1, log_every=min(10, eval_every), keep=a.keep,
        seed=a.seed, compile=a.compile, optimizer=a.optimizer, device=a.device,
    )  # fmt: skip
    metric, higher = primary_metric(a.task, a.problem)
    head_desc = head.describe()
    config = {
        "kind": "finetune",
        "task": a.task,
        "method": a.method,
        "finetune": run_settings(a),
        "train": dataclasses.asdict(cfg),
        "method_settings": getattr(method, "describe", lambda: {})(),
        "head": head_desc,
        "labels": data.label_map.to_dict() if data.label_map is not None else None,
        "backbone": backbone_spec(model),
        "base": base.source,
    }
    if isinstance(method, BlockMethod):  # a bad --top-k fails here, before the run directory is touched
        if not any(p.numel() for g in method.param_groups(model) for p in g["params"]):
            raise TinygraftError(f"method {a.method} trains nothing on the {a.task} task (its head has no parameters); "
                                 "use full, top-k, gradual-unfreeze or lora")  # fmt: skip
    timer = {"eval_seconds": 0.0, "data_sha256": data_digests(a)}  # saved with every checkpoint (extra_state)
    if resume is not None:
        check_same_run(resume, config, a, timer["data_sha256"])
        timer["eval_seconds"] = resume.trainer_state.get("eval_seconds", 0.0)
    run_dir.prepare(resume=a.resume, overwrite=a.overwrite)
    if resume is None:
        run_dir.write_config(config)
        if data.label_map is not None:
            data.label_map.save(run_dir.path / "labels.json")
    job = Job(
        model=model, method=method, batcher=batcher, loss_fn=task_loss, evaluate=make_evaluate(a, data, pad_id, timer),
        count_tokens=L.count_tokens, config=config, task=a.task, metric=metric, higher_is_better=higher,
        keep_best=True, tokenizer_json=tokenizer.to_json(), extra_state=timer,
        extra_results={"base": base.source, "lr": lr, "seed": a.seed, "n_train": data.n_train, "n_val": data.n_val,
                       "head": head_desc, "method_settings": config["method_settings"]},
    )  # fmt: skip
    if a.patience is not None:
        _add_early_stop(job, a.patience, eval_every)
    if resume is not None:
        say(f"resuming {str(run_dir.path)!r} from step {resume.step} of {steps}")
    say(
        f"fine-tuning {base.source} ({model.family}) on {a.task}: {data.n_train} train / {data.n_val} val examples, "
        f"{steps} steps of {a.batch_size} (lr {lr:g}, method {a.method}), head {head_desc}, kernels: {describe()}"
    )
    if isinstance(method, GradualUnfreeze):
        shown = ", ".join(f"{name}@{s}" for s, name in method.schedule(model, steps))
        say(f"gradual unfreezing (unit@first step): {shown}")
    outcome = train(job, cfg, run_dir, resume=resume, stop_at=a.stop_at)
    results = dict(outcome.results)
    trainable, total = trainable_summary(model)
    results["trainable_params_max"] = trainable  # gradual unfreezing ends with more than it started
    if model.pooled_cache is not None:  # linear-probe: how often the frozen backbone was skipped
        c = model.pooled_cache
        results["feature_cache"] = {"examples": len(c.store), "hits": c.hits, "misses": c.misses}
    results["eval_seconds"] = timer["eval_seconds"]
    results["train_seconds_excl_eval"] = results["train_seconds"] - timer["eval_seconds"]
    run_dir.write_results(results)
    return outcome.__class__(outcome.status, outcome.step, results)


# ------------------------------------------------------------------------------------------------------ resume
def resume_args(given: FinetuneArgs, run_dir: RunDir):
    """The saved run's own arguments (flags that differ from them are refused, by name) and its latest checkpoint."""
    from tinygraft.core import checkpoint

    ckpt = checkpoint.load(run_dir.path)
    saved = ckpt.config.get("finetune")
    if ckpt.config.get("kind") != "finetune" or not isinstance(saved, dict):
        raise TinygraftError(f"{str(run_dir.path)!r} holds a pre-training run, not a fine-tuning one; continue it "
                             "with 'tinygraft pretrain --resume'")  # fmt: skip
    defaults = FinetuneArgs(out=given.out)
    names = [f.name for f in dataclasses.fields(FinetuneArgs) if f.name not in INVOCATION]
    changed = [n for n in names if getattr(given, n) != getattr(defaults, n) and getattr(given, n) != saved.get(n)]
    if changed:
        shown = ", ".join(f"--{n.rstrip('_').replace('_', '-')} (saved: {saved.get(n)!r})" for n in changed)
        raise TinygraftError(f"--resume continues the run with its saved settings; drop {shown} or start a new run")
    kept = {n: saved[n] for n in names if n in saved}
    device = given.device if given.device != defaults.device else saved.get("device", defaults.device)
    args = FinetuneArgs(**kept, out=given.out, resume=True, stop_at=given.stop_at, device=device)
    return args, ckpt


def data_digests(a: FinetuneArgs) -> dict:
    """sha256 of the training and validation files: a resumed run must read the very same examples."""
    paths = {"train": a.train, "val": a.val}
    return {k: hashlib.sha256(Path(v).read_bytes()).hexdigest() for k, v in paths.items() if v and Path(v).is_file()}


def check_same_run(resume, config: dict, a: FinetuneArgs, digests: dict) -> None:
    """Refuse a resume that would not continue the very run the checkpoint holds: other data, another backbone."""
    saved = resume.trainer_state.get("data_sha256") or {}
    for side, digest in digests.items():
        if side in saved and saved[side] != digest:
            raise TinygraftError(f"the {side} file '{getattr(a, side)}' changed since the checkpoint was written, so "
                                 "the run cannot continue exactly; restore it or start a new run")  # fmt: skip
    # The base's path may move with its environment and a setting newer than the run is absent from its config;
    # the architecture, the head, the labels and the method may not change.
    old, new = flatten(resume.config), flatten(json.loads(json.dumps(config)))
    same = {k for k in old.keys() & new.keys() if old[k] == new[k] or k == "base" or k.endswith(".device")}
    differ = sorted(old.keys() & new.keys() - same)
    if differ:
        raise TinygraftError(f"the rebuilt run differs from the checkpoint's in {', '.join(differ[:5])} (did the base "
                             "model change?); it cannot continue exactly")  # fmt: skip


def _add_early_stop(job, patience: int, eval_every: int) -> None:
    """Stop once `patience` evaluations have passed without a new best (from the loop's own `best`, so a
    resumed run counts the same)."""

    def should_stop(step: int, best: dict) -> bool:
        return best.get("step") is not None and (step - best["step"]) // eval_every >= patience

    job.should_stop = should_stop


def results_json(run: str | Path) -> dict:
    path = Path(run) / "results.json"
    if not path.is_file():
        raise TinygraftError(f"'{run}' holds no results.json (did the run finish?)")
    return read_json(path, "results file")
