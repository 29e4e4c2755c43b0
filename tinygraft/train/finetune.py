"""`tinygraft finetune`: a pretrained backbone + a task head, trained by a method, on labeled data, in the one loop.

    --from (HF dir | minilm | a tinygraft run) -> backbone + tokenizer (+ the checkpoint's sentence pooling)
    --task -> tasks/<task>.py: read the training and validation files (the stdlib docstring demo when classify has no
        --train), the label map (from the training file), features, the head, the metric, the scorer
    --method -> train/methods/: which parameters train, when, at what learning rate
    Job(model, method, LabeledBatcher, loss, evaluate = the task's scorer over the validation set) -> train/loop.py

The schedule is fine-tuning's usual one (BERT, `transformers`' Trainer): linear warmup over `--warmup` (10%) of
the steps, then linear decay to zero; AdamW with decoupled weight decay 0.01, betas (0.9, 0.999), grad clip 1.
`--steps` defaults to `--epochs` passes over the training set; the model is evaluated once per epoch (or every
`--eval-every` steps) and the best checkpoint on the task's metric is the one results.json reports.

The run's config.json (in the run directory and in every checkpoint) holds everything needed to rebuild the model
without the base: the settings as resolved (FinetuneConfig), the backbone's architecture, the head's description
and the label map.
"""

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinygraft.core import checkpoint, dist, precision
from tinygraft.core.config import load_config_file, to_dict
from tinygraft.data import arrow
from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.kernels.backend import describe
from tinygraft.models.heads import TaskModel, unwrap
from tinygraft.models.pooling import head_pooling
from tinygraft.models.pretrained import record_name, resolve_pretrained
from tinygraft.peft.adapters import adapter_layers, unload
from tinygraft.tasks import get_task
from tinygraft.tasks.base import say
from tinygraft.train import adapt_first, board, continual, distill, guards, methods, multi, probe_fit, runs
from tinygraft.train import config as C
from tinygraft.train.config import FinetuneConfig, TrainConfig, flatten
from tinygraft.train.loop import Job, Outcome, measure, resolve_device, seed_everything, to_device, train
from tinygraft.train.methods.adapter import AdapterMethod, is_adapter_checkpoint, read_base_record
from tinygraft.train.methods.base import FitData
from tinygraft.train.run_dir import RunDir

# what a resume may change: where it runs, how it saves memory, what it logs and whether TensorBoard watches, and the
# precision (under bf16 autocast the weights and optimizer state stay fp32, so the checkpoint is the same)
RESUMABLE = {"train.device", "train.activation_checkpointing", "train.tensorboard", "train.precision",
             "train.log_every"}  # fmt: skip


@dataclass
class FinetuneArgs:
    """How `finetune` is invoked: the run directory, and the settings given (flags, a --config file, --set)."""

    out: str
    flags: dict = field(default_factory=dict)  # {"source": "minilm", "train.lr": 1e-3, "method_settings.r": 4}
    config: str | None = None  # a TOML (or JSON) file of settings
    sets: list[str] | None = None
    overwrite: bool = False
    resume: bool = False  # continue the run in `out` from its latest checkpoint, with its own saved settings
    stop_at: int | None = None  # stop after this step (a checkpoint to resume from later)


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
    backbone: object  # GPT or BERT
    tokenizer: object
    source: str  # as the run records it: 'minilm', or an absolute path
    pooling: str | None  # the checkpoint's sentence-transformers pooling, as a head pooling
    base_file: Path | None  # the directory the backbone's weights are, byte for byte (an adapter's base)
    loaded: runs.Loaded | None = None  # a fine-tuned run's (its head may be reused)
    head: object = None  # a head that comes with the backbone (a student built from its teacher)


def load_base(spec: str) -> Base:
    path = resolve_pretrained(spec)
    if not path.exists():
        raise TinygraftError(f"--from {spec!r} is neither a directory nor a known model name (try 'minilm')")
    loaded = runs.load(path)
    if loaded.kind == "huggingface":
        return Base(
            unwrap(loaded.model), loaded.tokenizer, record_name(path), head_pooling(loaded.pooling), loaded.base_file
        )
    if loaded.kind == "finetune":
        return Base(loaded.model.backbone, loaded.tokenizer, record_name(path), None, None, loaded)
    model = loaded.model
    if next(adapter_layers(model), None) is not None:  # a LoRA pre-training run comes with its adapter merged
        model = unload(model, merge=True)
    return Base(unwrap(model), loaded.tokenizer, record_name(path), None, None)


def distill_base(cfg: FinetuneConfig, teacher) -> Base:
    """The student of a fine-tuned teacher, as a base: its task must be the teacher's."""
    if teacher.kind != "finetune":
        raise TinygraftError(f"--teacher '{teacher.source}' is not a fine-tuned run, so it has no task to distil")
    if teacher.loaded.finetune.task != cfg.task:
        raise TinygraftError(
            f"--teacher '{teacher.source}' was fine-tuned on {teacher.loaded.finetune.task}, not {cfg.task}; "
            "the student learns the teacher's task"
        )
    distill.check_choice(cfg.distill)
    student = cfg.distill.student
    if cfg.distill.student_from_teacher is None and not distill.is_preset(student):
        base = load_base(student)
        distill.check_tokenizers(teacher.tokenizer, base.tokenizer, f"--student '{student}'")
        return base
    backbone, head = distill.task_student(cfg.distill, teacher)
    return Base(backbone, teacher.tokenizer, cfg.source, None, None, head=head)


def backbone_spec(model: TaskModel) -> dict:
    bb = model.backbone
    return {"family": model.family, "config": to_dict(bb.config), "pooler": getattr(bb, "pooler", None) is not None}


# ---------------------------------------------------------------------------------------------------- the data
@dataclass
class TaskData:
    train: list[dict]  # features
    val: list[dict]
    label_map: L.LabelMap | None
    val_examples: list
    n_train: int
    n_val: int
    notes: list[str] = field(default_factory=list)  # the readers' warnings, one sentence each
    train_lines: list[int] = field(default_factory=list)  # each training feature's line in its file


def prepare_data(cfg: FinetuneConfig, run_dir: Path, tokenizer, loaded: runs.Loaded | None) -> TaskData:
    task, settings, data = get_task(cfg.task), cfg.task_settings, cfg.data
    data = dataclasses.replace(data, train=runs.in_run(run_dir, data.train), val=runs.in_run(run_dir, data.val))
    read_train, read_val = task.read_training(data, settings), task.read_validation(data, settings)
    notes = [*getattr(read_train, "notes", []), *getattr(read_val, "notes", [])]  # what the readers had to say
    train_ex = subset(read_train, data.max_train)
    val_ex = subset(read_val, data.max_val)  # random, not the first N: a file sorted by genre or date would mislead
    if not train_ex:
        raise TinygraftError(f"training file '{data.train}' holds no examples")
    if not val_ex:
        raise TinygraftError(f"validation file '{data.val}' holds no examples")
    label_map = task.label_map(train_ex, settings)
    same_task = loaded is not None and loaded.finetune.task == cfg.task
    if same_task and label_map is not None:  # fine-tuning a fine-tuned run further: its head decides the labels
        L.check_label_count(label_map, loaded.model.head.num_labels, "the head loaded from --from")
        label_map = loaded.label_map or label_map
    train_f = task.encode(train_ex, tokenizer, data, settings, label_map, str(data.train))
    val_f = task.encode(val_ex, tokenizer, data, settings, label_map, str(data.val or data.train))
    lines = [ex.line for ex in train_ex] if len(train_f) == len(train_ex) else []  # (QA windows are not 1:1)
    return TaskData(train_f, val_f, label_map, val_ex, len(train_ex), len(val_ex), notes, lines)


def with_demo(cfg: FinetuneConfig, run_dir: Path) -> FinetuneConfig:
    """No --train: the task's built-in demo, written into the run (recorded relative to it)."""
    if cfg.data.train is not None:
        return cfg
    task = get_task(cfg.task)
    files = task.demo(run_dir / "demo_data")
    if files is None:
        raise TinygraftError(f"the {cfg.task} task needs --train FILE; only classify has a built-in demo")
    train_path, val_path = files
    say(f"no --train given: the stdlib docstring demo (which package a docstring comes from), in {train_path}")
    data = dataclasses.replace(
        cfg.data,
        train=runs.record_path(str(train_path), run_dir),
        val=runs.record_path(str(val_path), run_dir),
        text_col="text",
        label_col="label",
    )
    return dataclasses.replace(cfg, data=data)


# --------------------------------------------------------------------------------------------------- the job
def buckets(cfg: FinetuneConfig) -> tuple[int, int]:
    """collate's (multiple, cap): under --compile, lengths padded up to multiples of L.BUCKET (at most the max
    length), so the graph compiles for a few lengths, not one per batch; eager pads to each batch's longest row."""
    return (L.BUCKET if cfg.train.compile else 1), cfg.data.max_length


def make_evaluate(cfg: FinetuneConfig, data: TaskData, pad_id: int, timer: dict):
    task = get_task(cfg.task)

    def evaluate(model) -> dict:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        scorer = task.scorer(cfg.task_settings, data.label_map, data.val_examples, data.val)
        batches = L.eval_batches(data.val, cfg.train.eval_batch_size, pad_id, *buckets(cfg))
        for batch in dist.mine(batches) if scorer.collected is not None else batches:  # several processes: a share
            batch = to_device(batch, device)
            outputs, loss = model(batch)
            scorer.add(outputs, batch, loss)
        scorer.gather()
        timer["eval_seconds"] += time.perf_counter() - t0
        return scorer.result()

    return evaluate


def make_multi_evaluate(cfg: FinetuneConfig, by_name: dict, pad_id: int, timer: dict):
    """Each name's scorer over its own validation file, through its own adapter and head; the run's metric is the
    mean of the names' primary metrics (so is its loss), each name's kept as "<name>.<metric>"."""
    metric, _ = get_task(cfg.task).metric(cfg.task_settings)
    each = {name: make_evaluate(cfg, data, pad_id, timer) for name, data in by_name.items()}

    def evaluate(model) -> dict:
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        scores = {name: fn(model.task_model(name)) for name, fn in each.items()}
        out = {k: sum(s[k] for s in scores.values()) / len(scores) for k in (metric, "loss")}
        out.update({f"{name}.{k}": v for name, s in scores.items() for k, v in s.items()})
        return out

    return evaluate


def fit_scorer(method, model: TaskModel, cfg: FinetuneConfig, data: TaskData, tokenizer, pad_id: int, timer) -> None:
    """A method that trains nothing (zero-shot, few-shot) builds its scorer from the data: its training time."""
    t0 = time.perf_counter()
    names = data.label_map.names if data.label_map is not None else []
    fit = FitData(cfg.task, cfg.task_settings, names, data.train, data.train_lines, tokenizer, cfg.data.max_length,
                  cfg.train.eval_batch_size, pad_id, cfg.train.seed, resolve_device(cfg.train.device))  # fmt: skip
    for line in method.fit(model, fit):
        say(line)
    timer["fit_seconds"] = time.perf_counter() - t0


def task_loss(model, batch):
    return model(batch)[1]


def normalized_flags(flags: dict, run_dir: Path) -> dict:
    """The flags as a run records them: the files it reads relative to it when inside it, else absolute; the source
    by name when it is the shipped MiniLM."""
    out = dict(flags)
    for key in ("data.train", "data.val"):
        value = out.get(key)
        named = multi.named_files(value, "--" + key.split(".")[1]) if value is not None else None
        if named is not None:
            out[key] = [f"{n}={runs.record_path(f, run_dir)}" for n, f in named.items()]
        elif value is not None:
            out[key] = runs.record_path(value, run_dir)
    if out.get("continual.watch") is not None:
        out["continual.watch"] = [continual.record(p, run_dir) for p in continual.as_list(out["continual.watch"])]
    if out.get("source") is not None and resolve_pretrained(out["source"]).exists():
        out["source"] = record_name(resolve_pretrained(out["source"]))
    return out


def resolve(args: FinetuneArgs, run_dir: RunDir):
    """(FinetuneConfig, the checkpoint to resume or None)."""
    file = load_config_file(args.config) if args.config else None
    flags = normalized_flags(args.flags, run_dir.path)
    if not args.resume:
        return C.resolve_finetune(None, file, flags, args.sets), None
    if adapt_first.interrupted(run_dir.path):  # stopped in --adapt-first: the fine-tuning starts afresh after it
        saved = runs.upgrade(run_dir.read_config())
        return C.resolve_finetune(saved["finetune"], file, flags, args.sets), None
    ckpt = checkpoint.load(run_dir.path)
    saved = runs.upgrade(ckpt.config)
    if saved.get("kind") != "finetune":
        raise TinygraftError(
            f"{str(run_dir.path)!r} holds a pre-training run, not a fine-tuning one; continue it "
            "with 'tinygraft pretrain --resume'"
        )
    cfg = C.resolve_finetune(saved["finetune"], file, flags, args.sets)
    old, new = flatten(to_dict(C.resolve_finetune(saved["finetune"], None, {}, None))), flatten(to_dict(cfg))
    changed = [k for k in sorted(old.keys() | new.keys()) if k not in RESUMABLE and old.get(k) != new.get(k)]
    if changed:
        shown = ", ".join(f"{C.finetune_flag(cfg, k)} (saved: {old.get(k)!r})" for k in changed)
        raise TinygraftError(f"--resume continues the run with its saved settings; drop {shown} or start a new run")
    return cfg, ckpt


def finetune(args: FinetuneArgs) -> Outcome:
    """The job; its run directory is held (an OS lock) from the first look at it to the end."""
    with RunDir(args.out) as run_dir:
        return _finetune(args, run_dir)


def _finetune(args: FinetuneArgs, run_dir: RunDir) -> Outcome:
    run_dir.check(resume=args.resume, overwrite=args.overwrite)
    if args.stop_at is not None and args.stop_at < 1:
        raise TinygraftError(f"--stop-at must be at least 1, got {args.stop_at}")
    cfg, resume = resolve(args, run_dir)
    board.require(cfg.train.tensorboard)
    task = get_task(cfg.task)
    method = methods.make_method(cfg.method, cfg.method_settings, "finetune")  # an unknown name fails before loading
    resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    teacher = distill.load_teacher(runs.in_run(run_dir.path, cfg.distill.teacher)) if cfg.distill.teacher else None
    base = distill_base(cfg, teacher) if teacher is not None else load_base(runs.in_run(run_dir.path, cfg.source))
    tokenizer = base.tokenizer
    if tokenizer is None:
        raise TinygraftError(f"--from '{base.source}' has no tokenizer")
    positions = getattr(base.backbone.config, "max_position_embeddings", None) or base.backbone.config.block_size
    if cfg.data.max_length > positions:
        say(f"--max-length {cfg.data.max_length} is above the model's {positions} positions; using {positions}")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=positions))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    timer = {"eval_seconds": 0.0}
    named = multi.named_files(cfg.data.train, "--train")
    if named is None:
        if multi.named_files(cfg.data.val, "--val") is not None:
            raise TinygraftError("--val NAME=FILE names an adapter, but --train gives one plain file; name both")
        cfg = with_demo(cfg, run_dir.path)
        data = prepare_data(cfg, run_dir.path, tokenizer, teacher.loaded if teacher is not None else base.loaded)
        loaded = base.loaded if base.loaded is not None and base.loaded.finetune.task == cfg.task else None
        head = base.head or (
            loaded.model.head
            if loaded is not None
            else task.make_head(base.backbone, cfg.task_settings, data.label_map, base.pooling)
        )
        model = TaskModel(base.backbone, head)
        train_features, evaluate = data.train, make_evaluate(cfg, data, pad_id, timer)
        labels = data.label_map.to_dict() if data.label_map is not None else None
        head_desc = {"task": task.name, **task.describe_head(head)}
    else:
        if teacher is not None:
            raise TinygraftError("--train NAME=FILE trains several adapters; distil one task at a time")
        if not isinstance(method, AdapterMethod):
            raise TinygraftError(
                f"--train NAME=FILE trains one adapter per name; --method {cfg.method} is not an adapter method "
                "(lora, dora, ia3, houlsby, pfeiffer, prompt-tuning, prefix-tuning)"
            )
        pairs = multi.pair_up(named, multi.named_files(cfg.data.val, "--val") if cfg.data.val else None)
        by_name = {}
        for name, (train_file, val_file) in pairs.items():
            one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=train_file, val=val_file))
            by_name[name] = prepare_data(one, run_dir.path, tokenizer, None)
        heads = {
            n: task.make_head(base.backbone, cfg.task_settings, d.label_map, base.pooling) for n, d in by_name.items()
        }
        model = multi.MultiTaskModel(base.backbone, heads)
        train_features = [{**f, "adapter": n} for n, d in by_name.items() for f in d.train]
        parts = by_name.values()
        data = TaskData(train_features, [], None, [], sum(d.n_train for d in parts), sum(d.n_val for d in parts),
                        [note for d in parts for note in d.notes])  # fmt: skip
        evaluate = make_multi_evaluate(cfg, by_name, pad_id, timer)
        labels = {n: d.label_map.to_dict() if d.label_map is not None else None for n, d in by_name.items()}
        head_desc = {n: {"task": task.name, **task.describe_head(h)} for n, h in heads.items()}
        method = multi.MultiAdapter(method, list(by_name))
    model.train()
    device = resolve_device(cfg.train.device)
    keep = continual.in_run_dir(cfg.continual, run_dir.path)
    watchers, measures, corpora = continual.finetune_watchers(keep, model.backbone, tokenizer, cfg.data.max_length,
                                                              cfg.train.eval_batch_size, device)  # fmt: skip
    evaluate = continual.with_watched(evaluate, watchers)
    if teacher is not None and cfg.continual.adapt_first:
        raise TinygraftError("--adapt-first adapts a pretrained backbone to the task's text; a distilled student "
                             "learns from its teacher instead, so give one or the other")  # fmt: skip
    distiller = None
    if teacher is not None:  # each example carries its index: the teacher's outputs are cached by it
        distiller = distill.Distiller(cfg.distill, teacher.model, model, task_loss, "task")
        data.train[:] = [{**f, "example": i} for i, f in enumerate(data.train)]
    batcher = L.LabeledBatcher(data.train, cfg.train.batch_size, pad_id, cfg.train.seed, True, *buckets(cfg))
    steps = cfg.train.steps or cfg.train.epochs * batcher.steps_per_epoch
    probe = probe_fit.plan(method, cfg.train.steps is not None, getattr(model, "head", None), distiller is not None)
    steps = probe.steps(steps, batcher.steps_per_epoch) if probe is not None else steps
    steps = 0 if method.trains_nothing else steps  # zero-shot, few-shot: one evaluation of what `fit` built
    if isinstance(method, AdapterMethod):
        if resume is not None and is_adapter_checkpoint(resume.path):
            record = read_base_record(resume.path)
            inner = method.inner if named is not None else method
            method = type(inner)(cfg.method_settings, record["path"], record["sha256"])
            method = multi.MultiAdapter(method, list(named)) if named is not None else method
        else:
            method.bind_base(base.base_file)
    plan = method.prepare(model, steps, batcher.steps_per_epoch) + ([probe.message(data.n_train)] if probe else [])
    lr = 0.0 if method.trains_nothing else cfg.train.lr if cfg.train.lr is not None else methods.default_lr(cfg.method)
    eval_every = cfg.train.eval_every or batcher.steps_per_epoch
    t = cfg.train
    loop_cfg = TrainConfig(
        steps=steps,
        batch_size=t.batch_size,
        seq_len=cfg.data.max_length,
        lr=lr,
        min_lr_ratio=0.0,
        warmup_steps=int(t.warmup * steps),
        schedule="linear",
        weight_decay=t.weight_decay,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        grad_clip=1.0,
        eval_every=eval_every,
        eval_batches=1,
        log_every=t.log_every or min(10, eval_every),
        keep=t.keep,
        seed=t.seed,
        compile=t.compile,
        optimizer=t.optimizer,
        device=t.device,
        precision=t.precision,
        activation_checkpointing=t.activation_checkpointing,
        tensorboard=t.tensorboard,
        fsdp=t.fsdp,
    )
    metric, higher = task.metric(cfg.task_settings)
    config = {
        "format": runs.FORMAT,
        "kind": "finetune",
        "task": cfg.task,
        "method": cfg.method,
        "finetune": to_dict(cfg),
        "train": dataclasses.asdict(loop_cfg),
        "head": head_desc,
        "labels": labels,
        "backbone": backbone_spec(model),
        "base": base.source,
    }
    if named is not None:
        config["adapters"] = list(named)
    if method.trains_nothing:  # its scorer is built now, so bad --label-text fails before the run directory is touched
        fit_scorer(method, model, cfg, data, tokenizer, pad_id, timer)
    elif not method.attaches_modules:  # one with nothing to train on this task fails here, before anything is written
        if not any(p.numel() for g in method.param_groups(model) for p in g["params"]):
            raise TinygraftError(
                f"method {cfg.method} trains nothing on the {cfg.task} task (its head has no "
                "parameters); use full, top-k, gradual-unfreeze or lora"
            )
    timer["data_sha256"] = data_digests(cfg, run_dir.path)  # saved with every checkpoint
    if resume is not None:
        check_same_run(resume, config, cfg, timer["data_sha256"])
        timer["eval_seconds"] = resume.trainer_state.get("eval_seconds", 0.0)
        for key in ("adapt_first", "before_metrics"):
            if key in resume.trainer_state:
                timer[key] = resume.trainer_state[key]
        if args.stop_at is not None and args.stop_at <= resume.step:
            raise TinygraftError(
                f"--stop-at {args.stop_at} is not after the checkpoint's step {resume.step}; nothing to do"
            )
    run_dir.prepare(resume=args.resume, overwrite=args.overwrite)
    if resume is None and run_dir.writer:
        run_dir.write_config(config)
        if data.label_map is not None:
            data.label_map.save(run_dir.path / "labels.json")
        for name, d in by_name.items() if named is not None else ():
            if d.label_map is not None:
                d.label_map.save(run_dir.path / f"labels.{name}.json")
    if cfg.continual.adapt_first and resume is None:
        timer["adapt_first"] = adapt_first.adapt(
            model.backbone, model.family, cfg.continual.adapt_first, cfg.continual.adapt_lr, data.train, data.val,
            tokenizer, cfg.train, cfg.data.max_length, run_dir.path, say
        )  # fmt: skip
        if timer["adapt_first"]["status"] == "interrupted":
            return Outcome("interrupted", 0, {})
        if method.trains_nothing:  # the backbone it scores with has changed
            fit_scorer(method, model, cfg, data, tokenizer, pad_id, timer)
    if watchers:  # every metric where the fine-tuning starts (after --adapt-first), watched texts included
        timer["before_metrics"] = timer.get("before_metrics") or measure(model, evaluate, device)
        forgetting = continual.forgetting_results(timer["before_metrics"], corpora, cfg.data.train, measures)
    job = Job(
        model=model,
        method=method,
        batcher=batcher,
        loss_fn=task_loss,
        evaluate=evaluate,
        count_tokens=L.count_tokens,
        loss_count=task.loss_count,
        config=config,
        task=cfg.task,
        metric=metric,
        higher_is_better=higher,
        keep_best=True,
        tokenizer_json=tokenizer.to_json(),
        extra_state=timer,
        extra_results={
            "base": base.source,
            "lr": lr,
            "seed": t.seed,
            "n_train": data.n_train,
            "n_val": data.n_val,
            "head": head_desc,
            "method_settings": method.describe(),
        },
    )
    fitted: dict = {}  # how linear-probe's fit went (train/probe_fit.py), for results.json
    if probe is not None and probe.fits:
        job.converge = probe_fit.head_fitter(data.train, t.eval_batch_size, pad_id, probe.l2, fitted)
    if t.patience is not None:
        _add_early_stop(job, t.patience, eval_every)
    if distiller is not None:
        device = resolve_device(t.device)
        fill = lambda: distiller.fill_cache(data.train, t.eval_batch_size, pad_id, device)  # noqa: E731
        distill.attach(job, distiller, teacher, evaluate, device, fill)
    if resume is not None:
        say(f"resuming {str(run_dir.path)!r} from step {resume.step} of {steps}")
    say(
        f"fine-tuning {base.source} ({model.family}) on {cfg.task}: {data.n_train} train / {data.n_val} val examples, "
        f"{steps} steps of {t.batch_size} (lr {lr:g}, method {cfg.method}), head {head_desc}, "
        f"{precision.resolve(t.precision, resolve_device(t.device)).line}, kernels: {describe()}"
    )
    for line in plan:
        say(line)
    for note in data.notes:
        say(f"warning: {note}")
    files = [runs.in_run(run_dir.path, f) for f in (cfg.data.train, cfg.data.val)] if named is None else None
    early = guards.before_training(cfg, data.n_train, *files) if files else []  # a guard's first look: the settings
    for warning in early:
        say(f"warning: {warning}")
    outcome = train(job, loop_cfg, run_dir, resume=resume, stop_at=args.stop_at)
    late = guards.after_training(cfg, None if job.converge else lr, run_dir.metrics())
    late += [w for w in [probe_fit.not_converged(fitted)] if w]
    for warning in late:
        say(f"warning: {warning}")
    results = dict(outcome.results)
    trainable, _ = methods.trainable_summary(model)
    results["trainable_params_max"] = trainable  # gradual unfreezing ends with more than it started
    results["method_settings"] = method.describe()
    if getattr(model, "pooled_cache", None) is not None:  # linear-probe: how often the backbone was skipped
        c = model.pooled_cache
        results["feature_cache"] = {"examples": len(c.store), "hits": c.hits, "misses": c.misses}
    results["warnings"] = [*data.notes, *early, *late]
    if probe is not None:
        results["probe"] = fitted or {"fit": "steps", "why": probe.why}
    if named is not None:  # each name's metrics at the kept step, from the "<name>.<metric>" keys
        results["per_adapter"] = multi.per_adapter(results.get("metrics") or {}, list(named))
    if distiller is not None:
        results["distill"].update(distill.task_report(run_dir.path, teacher, model, data.val, pad_id, t, results))
    if "adapt_first" in timer:
        results["adapt_first"] = timer["adapt_first"]
    if watchers:
        results["forgetting"] = forgetting
    results["eval_seconds"] = timer["eval_seconds"]
    results["train_seconds"] += timer.get("fit_seconds", 0.0)  # a method that trains nothing: building its scorer
    results["train_seconds_excl_eval"] = results["train_seconds"] - timer["eval_seconds"]
    run_dir.write_results(results)
    return Outcome(outcome.status, outcome.step, results)


# ------------------------------------------------------------------------------------------------------ resume
def data_digests(cfg: FinetuneConfig, run_dir: Path) -> dict:
    """sha256 of the training and validation files (a saved dataset: the split read): a resumed run must read the very
    same examples."""
    paths = {}
    for side in ("train", "val"):
        value = getattr(cfg.data, side)
        named = multi.named_files(value, f"--{side}") or {None: value}
        paths.update({(side if n is None else f"{side}:{n}"): runs.in_run(run_dir, f) for n, f in named.items()})
    digests = {k: arrow.data_sha256(v, "validation" if k.startswith("val") else "train") for k, v in paths.items()}
    return {k: d for k, d in digests.items() if d is not None}


def check_same_run(resume, config: dict, cfg: FinetuneConfig, digests: dict) -> None:
    """Refuse a resume that would not continue the very run the checkpoint holds: other data, another backbone."""
    saved = resume.trainer_state.get("data_sha256") or {}
    for side, digest in digests.items():
        if side in saved and saved[side] != digest:
            raise TinygraftError(
                f"the {side} file '{getattr(cfg.data, side)}' changed since the checkpoint was "
                "written, so the run cannot continue exactly; restore it or start a new run"
            )
    # The base's path may move with its environment and a setting newer than the run is absent from its config;
    # the architecture, the head, the labels and the method may not change.
    old, new = flatten(runs.upgrade(resume.config)), flatten(json.loads(json.dumps(config)))
    free = tuple(k[len("train") :] for k in RESUMABLE)  # (".device", ...): in both the finetune and train sections
    same = {k for k in old.keys() & new.keys() if old[k] == new[k] or k == "base" or k.endswith(free)}
    differ = sorted(old.keys() & new.keys() - same)
    if differ:
        raise TinygraftError(
            f"the rebuilt run differs from the checkpoint's in {', '.join(differ[:5])} (did the base "
            "model change?); it cannot continue exactly"
        )


def _add_early_stop(job, patience: int, eval_every: int) -> None:
    """Stop once `patience` evaluations have passed without a new best (from the loop's own `best`, so a
    resumed run counts the same)."""

    def should_stop(step: int, best: dict) -> bool:
        return best.get("step") is not None and (step - best["step"]) // eval_every >= patience

    job.should_stop = should_stop
