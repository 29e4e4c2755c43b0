"""`tinygraft pretrain`: config -> corpus -> tokenizer -> token cache -> batcher -> model -> the loop.

GPT presets train a causal language model, BERT presets a masked language model (tasks/lm.py: the two objectives);
the loop (train/loop.py) is the same.

`--from PATH` continues pre-training from a pretrained directory or another run (train/runs.py reads it): its
weights, its tokenizer and its model settings (a preset or `model.*` setting that changes the architecture is
refused by name). `--method lora` (any adapter method) trains adapters over a frozen base; over a Hugging Face
directory its checkpoints hold only the adapter and the base's name or path and sha256.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygraft.core import checkpoint, precision
from tinygraft.core.config import load_toml, to_dict
from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.kernels.backend import describe
from tinygraft.models.presets import build_model, family, get_preset
from tinygraft.models.pretrained import inspect, load_pretrained_model, locate, record_name, resolve_pretrained
from tinygraft.models.student import student_from_teacher
from tinygraft.peft.adapters import adapter_layers, unload
from tinygraft.tasks.lm import objective_for, unigram_entropy
from tinygraft.train import board, continual, distill, methods, runs
from tinygraft.train import config as C
from tinygraft.train.ewc import EWC
from tinygraft.train.loop import Job, Outcome, measure, resolve_device, seed_everything, train
from tinygraft.train.methods.adapter import AdapterMethod, check_base, is_adapter_checkpoint, read_base_record
from tinygraft.train.run_dir import RunDir


def positions(model_cfg) -> int:
    return model_cfg.block_size if family(model_cfg) == "gpt" else model_cfg.max_position_embeddings


def check_fit(run: C.RunConfig, model_cfg, tokenizer: TextTokenizer, explicit: set[str]):
    """Set the model's vocab from the tokenizer (unless the user fixed it) and refuse what cannot fit."""
    if "vocab_size" in explicit:
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise TinygraftError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}; "
                "raise model.vocab_size or use a smaller tokenizer"
            )
    else:
        model_cfg = type(model_cfg)(**{**vars(model_cfg), "vocab_size": tokenizer.vocab_size})
    if run.train.seq_len > positions(model_cfg):
        name = "block_size" if family(model_cfg) == "gpt" else "max_position_embeddings"
        raise TinygraftError(
            f"train.seq_len={run.train.seq_len} is longer than the model's {positions(model_cfg)} positions "
            f"(model.{name}); lower train.seq_len or raise model.{name}"
        )
    return model_cfg


@dataclass
class PretrainArgs:
    out: str
    preset: str | None = None
    config: str | None = None  # a TOML file
    data: str | None = None
    steps: int | None = None
    stop_at: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    precision: str | None = None  # --precision: auto, fp32 or bf16 (core/precision.py)
    seed: int | None = None
    keep: int | None = None
    fsdp: bool | None = None  # --fsdp: FSDP2 under torchrun
    sets: list[str] | None = None
    from_: str | None = None  # --from: a Hugging Face directory, 'minilm', or a tinygraft run or checkpoint
    new_head: bool = False  # --new-head: give a BERT source without a masked-LM head a fresh one
    method: str | None = None  # full (default) or an adapter method
    method_settings: dict = field(default_factory=dict)  # the method flags given: {"r": 4, ...}; absent = default
    distill: dict = field(default_factory=dict)  # `tinygraft distill`'s settings given: {"teacher": ..., ...}
    continual: dict = field(default_factory=dict)  # replay, EWC and watch flags given: {"replay": ..., ...}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- the source
@dataclass
class Source:
    path: Path
    model: torch.nn.Module  # GPT or BERTForMaskedLM, without adapters, on the CPU
    tokenizer: TextTokenizer
    base_file: Path | None  # the directory an adapter run can read its frozen base from again, byte for byte
    new_heads: list[str]
    notes: list[str]
    loaded: runs.Loaded | None = None  # what runs.load read (a run's settings: the corpus EWC's Fisher reads)


def load_source(spec: str, new_head: bool = False) -> Source:
    """What `--from` names, as a language model to pre-train further."""
    kind, path, _ = runs.locate_spec(spec)
    notes = []
    if kind == "finetune":
        raise TinygraftError(
            f"--from '{path}' is a fine-tuning run; export its backbone (`tinygraft export RUN --to "
            "DIR`) and start from that directory (with --new-head for a BERT)"
        )
    if kind == "huggingface":
        found = inspect(path)  # config.json and weight headers only
        is_gpt = found.family == "gpt"
        if not is_gpt and not found.heads["mlm"] and not new_head:
            raise TinygraftError(
                f"--from '{path}' is a BERT without a masked-LM head (cls.predictions.*), which masked-LM pre-training "
                "trains; add --new-head to start one from a fresh initialisation"
            )
        if new_head and (is_gpt or found.heads["mlm"]):
            notes.append(f"--new-head has no effect: '{path}' has its {'LM' if is_gpt else 'masked-LM'} head")
    loaded = runs.load(path, target="lm", new_head=new_head)
    model = loaded.model
    if loaded.report is not None and loaded.report.new_heads:
        notes.append(f"new {', '.join(loaded.report.new_heads)} initialised fresh (not in '{path}')")
    if next(adapter_layers(model), None) is not None:
        model = unload(model, merge=True)
        notes.append("the run's adapter is merged into its base weights")
    model.requires_grad_(True)
    new_heads = list(loaded.report.new_heads) if loaded.report is not None else []
    return Source(path.resolve(), model.train(), loaded.tokenizer, loaded.base_file, new_heads, notes + loaded.notes,
                  loaded)  # fmt: skip


def resolve_from(source: Source, file: dict | None, flags: dict, sets: list[str] | None):
    """(RunConfig, model config) of a new run `--from` a source: the model settings are the source's."""
    src_cfg, where = source.model.config, f"--from '{source.path}'"
    fam = family(src_cfg)
    asked = C.requested("preset", file, flags, sets)
    if asked is not None:
        preset_cfg = get_preset(str(asked))
        if family(preset_cfg) != fam:
            raise TinygraftError(
                f"--preset {asked} is a {family(preset_cfg).upper()} but {where} holds a {fam.upper()}; drop --preset "
                "(with --from the model is the checkpoint's)"
            )
        for k, v in to_dict(src_cfg).items():
            if k != "vocab_size" and k not in C.FROM_TUNABLE and getattr(preset_cfg, k) != v:
                raise TinygraftError(
                    f"--preset {asked} would change model.{k} of {where} from {v!r} to {getattr(preset_cfg, k)!r}; "
                    "drop --preset (with --from the model is the checkpoint's)"
                )
    method = str(C.requested("method", file, flags, sets) or "full")
    cls, _ = methods.lookup(method, "pretrain")
    base = {
        "preset": asked or ("gpt2" if fam == "gpt" else "bert-base"),  # names the model family; "model" has the rest
        "source": record_name(source.path),
        "new_head": bool(source.new_heads),
        "model": to_dict(src_cfg),
        "train": {
            "lr": cls.from_lr or methods.METHODS["full"].from_lr,
            "seq_len": min(C.TrainConfig.seq_len, positions(src_cfg)),
        },
    }
    run, model_cfg = C.resolve(base, file, flags, sets)
    wanted = to_dict(model_cfg)
    for k, v in to_dict(src_cfg).items():
        if k not in C.FROM_TUNABLE and wanted[k] != v:
            raise TinygraftError(
                f"model.{k}={wanted[k]!r} would change the architecture of {where} (its {k} is {v!r}); with --from "
                "the model is the checkpoint's, so drop that setting"
            )
    if run.data.tokenizer:
        raise TinygraftError(f"{where} brings its own tokenizer; drop data.tokenizer={run.data.tokenizer!r}")
    return dataclasses.replace(run, source=record_name(source.path), new_head=bool(source.new_heads)), model_cfg


def build_method(run: C.RunConfig, source: Source | None, resume) -> methods.Method:
    method = methods.make_method(run.method, run.method_settings, "pretrain")
    if not isinstance(method, AdapterMethod):
        return method
    if resume is not None:
        if is_adapter_checkpoint(resume.path):
            record = read_base_record(resume.path)
            return type(method)(run.method_settings, record["path"], record["sha256"])
        return method
    if source is not None and source.new_heads:
        raise TinygraftError(
            f"--method {run.method} freezes the base, so the fresh masked-LM head of --new-head would never train; "
            "pre-train it with --method full first, or start from a BERT that has one"
        )
    method.bind_base(source.base_file if source is not None else None)  # no file (a preset, a run): kept whole
    return method


def initial_model(model_cfg, source: Source | None, method: methods.Method):
    """The model before training: the source's weights, or on resume the frozen base an adapter checkpoint lacks
    (the loop then loads the checkpoint's tensors), or a fresh initialisation. Built from `model_cfg` so a changed
    dropout takes effect."""
    model = build_model(model_cfg)
    if source is not None:
        model.load_state_dict(source.model.state_dict())
    elif isinstance(method, AdapterMethod) and method.base is not None and method.base_sha256 is not None:
        check_base(method.base, method.base_sha256, method.label)
        base = load_pretrained_model(locate(method.base), "lm")
        model.load_state_dict(base.state_dict())
    return model


def continual_flags(given: dict, run_dir: Path) -> dict:
    """The continual flags given, their files recorded as runs record paths (train/runs.py record_path)."""
    out = {}
    for k, v in given.items():
        if v is None:
            continue
        if k in ("replay", "ewc_data"):
            v = continual.record(v, run_dir)
        elif k == "watch":
            v = [continual.record(p, run_dir) for p in continual.as_list(v)]
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ the command
def pretrain(args: PretrainArgs) -> Outcome:
    """The job; its run directory is held (an OS lock) from the first look at it to the end."""
    with RunDir(args.out) as run_dir:
        return _pretrain(args, run_dir)


def _pretrain(args: PretrainArgs, run_dir: RunDir) -> Outcome:
    flags = {"preset": args.preset, "data.corpus": runs.record_path(args.data, run_dir.path) if args.data else None,
             "train.steps": args.steps, "train.device": args.device,
             "train.precision": args.precision, "train.seed": args.seed, "train.keep": args.keep,
             "train.fsdp": args.fsdp,
             "method": args.method}  # fmt: skip
    flags = {k: v for k, v in flags.items() if v is not None}
    flags.update({f"method_settings.{k}": v for k, v in args.method_settings.items() if v is not None})
    flags.update({f"distill.{k}": v for k, v in args.distill.items() if v is not None})
    flags.update({f"continual.{k}": v for k, v in continual_flags(args.continual, run_dir.path).items()})
    file = load_toml(args.config) if args.config else None
    if args.stop_at is not None and args.stop_at < 1:
        raise TinygraftError(f"--stop-at must be at least 1, got {args.stop_at}")
    if args.new_head and args.from_ is None and not args.resume:
        raise TinygraftError("--new-head applies to a BERT loaded with --from; a model built from a preset has one")
    run_dir.check(resume=args.resume, overwrite=args.overwrite)  # (an old run is deleted only once all is checked)

    resume, source, tokenizer, teacher = None, None, None, None
    if args.distill.get("teacher") is not None and not args.resume:
        teacher = distill.load_teacher(args.distill["teacher"])
        if teacher.kind == "finetune":
            raise TinygraftError(f"--teacher '{teacher.source}' is a fine-tuned run; distil its task with --train")
        tokenizer = teacher.tokenizer
        if args.distill.get("student_from_teacher") is not None:
            layers = distill.student_layers(C.DistillSettings(**args.distill))
            model = student_from_teacher(teacher.model, layers).requires_grad_(True).train()
            source = Source(Path(teacher.source), model, teacher.tokenizer, None, [], [])
    if args.resume:
        resume = checkpoint.load(run_dir.path)
        saved = runs.upgrade(resume.config)
        if saved.get("kind") == "finetune":
            raise TinygraftError(
                f"{str(run_dir.path)!r} holds a fine-tuning run; continue it with 'tinygraft finetune --resume'"
            )
        saved = {k: v for k, v in saved.items() if k != "format"}
        if args.from_ is not None:  # a different source is refused below, by name
            given = resolve_pretrained(args.from_)
            if not given.exists():
                raise TinygraftError(f"--from {args.from_!r} does not exist")
            flags["source"] = record_name(given)
        run, model_cfg = C.resolve(saved, file, flags, args.sets)
        # The saved settings with today's defaults filled in (a run saved before a setting existed has none).
        C.refuse_changes(C.full_dict(*C.resolve(saved, None, {}, None)), C.full_dict(run, model_cfg))
        method = build_method(run, None, resume)
        if resume.tokenizer_path is None:
            raise TinygraftError(f"checkpoint {str(resume.path)!r} is incomplete: tokenizer.json is missing")
        tokenizer = TextTokenizer.load(resume.tokenizer_path)
        say(f"resuming {str(run_dir.path)!r} from step {resume.step} of {run.train.steps}")
    elif args.from_ is not None or source is not None:
        source = source or load_source(args.from_, new_head=args.new_head)
        for note in source.notes:
            say(f"note: {note}")
        run, model_cfg = resolve_from(source, file, flags, args.sets)
        method = build_method(run, source, None)
        if teacher is not None:
            distill.check_tokenizers(teacher.tokenizer, source.tokenizer, f"--student '{source.path}'")
        tokenizer = source.tokenizer
    else:
        run, model_cfg = C.resolve(None, file, flags, args.sets)
        method = build_method(run, None, None)
    if args.stop_at is not None and args.stop_at > run.train.steps:
        raise TinygraftError(f"--stop-at {args.stop_at} is beyond the run's {run.train.steps} steps")
    board.require(run.train.tensorboard)

    fam = family(model_cfg)
    corpus = runs.in_run(run_dir.path, run.data.corpus)
    documents = read_corpus(corpus, run.data.text_field)
    if tokenizer is None:
        if run.data.tokenizer:
            tokenizer = TextTokenizer.load(runs.in_run(run_dir.path, run.data.tokenizer))
        else:
            kind = "bpe" if fam == "gpt" else "wordpiece"
            tokenizer = TextTokenizer.train(documents, kind=kind, vocab_size=run.data.vocab_size)
    # A checkpoint's embedding (resumed or --from) keeps its rows; only a new model takes the tokenizer's size.
    fixed = {"vocab_size"} if resume or source else C.explicit_model_keys(file, args.sets)
    model_cfg = check_fit(run, model_cfg, tokenizer, fixed)
    if teacher is not None and source is None:  # a preset student: the teacher's vocabulary, not only its tokenizer
        model_cfg = distill.preset_config(run.preset, teacher.model, model_cfg)
    if run.distill.teacher is not None and teacher is None:
        teacher = distill.load_teacher(runs.in_run(run_dir.path, run.distill.teacher))
    cache = TokenCache.build(documents, tokenizer, val_fraction=run.data.val_fraction)
    if resume and resume.trainer_state.get("token_cache", cache.key) != cache.key:
        raise TinygraftError(
            f"the corpus {run.data.corpus or 'pydoc_data.topics'!r} changed since the checkpoint was written, so the "
            "run cannot continue exactly; restore it or start a new run"
        )
    if len(cache.val) < 2:
        raise TinygraftError("the corpus is too small to hold out validation tokens; give it more text")
    config = {"format": runs.FORMAT, **C.full_dict(run, model_cfg)}
    device = resolve_device(run.train.device)
    t = run.train
    seed_everything(t.seed)
    model = initial_model(model_cfg, source, method)
    objective = objective_for(family(model_cfg))
    # A distillation that cannot be (a layer out of range, widths without a projection) is refused before the
    # run directory is touched.
    distiller = distill.Distiller(run.distill, teacher.model, model, objective.loss, "lm") if teacher else None
    keep = continual.in_run_dir(run.continual, run_dir.path)
    corpora = continual.watched(keep, tokenizer, run.data)
    old = continual.replay_corpus(keep, tokenizer, run.data)
    ewc = None
    if keep.ewc > 0 and resume is None:
        ewc = continual.make_ewc(keep, model, method, source, objective, tokenizer, run, device, say)
    run_dir.prepare(resume=args.resume, overwrite=args.overwrite)
    if not resume:
        run_dir.write_config(config)
    if ewc is not None:
        if run_dir.writer:
            ewc.save(run_dir.path)
    elif keep.ewc > 0:
        ewc = EWC.load(keep.ewc, run_dir.path)

    eval_len = min(t.seq_len, len(cache.val) - 1)
    mask_prob = run.data.mask_prob
    batcher = objective.batcher(cache.train, t.batch_size, t.seq_len, tokenizer, t.seed, mask_prob)
    batcher = continual.replay_batcher(keep, old, batcher, objective, tokenizer, t, mask_prob)
    evaluate = objective.evaluator(cache.val, tokenizer, t.batch_size, eval_len, t.eval_batches, mask_prob, device)
    evaluate = continual.with_watched(
        evaluate, continual.lm_watchers(corpora, objective, tokenizer, t, mask_prob, device)
    )
    entropy = unigram_entropy(cache.val)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    origin = f"from {run.source}" if run.source else run.preset
    say(
        f"{origin} ({fam}, {n_params:,} parameters, method {run.method}), {tokenizer.kind} vocab "
        f"{tokenizer.vocab_size}, {len(cache.train):,} train / {len(cache.val):,} val tokens, device {device}, "
        f"{precision.resolve(t.precision, device).line}, kernels: {describe()}"
    )
    say(f"unigram entropy of the val tokens: {entropy:.4f} nats (a model must beat this to use context)")
    extra = {
        "val_unigram_entropy": entropy,
        "val_tokens": int(len(cache.val)),
        "preset": run.preset,
        "source": run.source,
    }
    before = resume.trainer_state.get("before_metrics") if resume else None
    if resume is None and (source is not None or corpora):  # where training starts, on every text it reports
        before = measure(model, evaluate, device)
        say(f"val loss before training: {before['loss']:.4f}"
            + "".join(f", {k} {v:.4f}" for k, v in before.items() if k.startswith(continual.PREFIX)))  # fmt: skip
    if source is not None and before is not None:
        extra["source_metrics"] = before
    if corpora:
        extra["forgetting"] = continual.forgetting_results(before, corpora, run.data.corpus)
    job = Job(
        model=model,
        method=method,
        batcher=batcher,
        loss_fn=objective.loss,
        evaluate=evaluate,
        count_tokens=objective.count_tokens,
        loss_count=objective.loss_count,
        config=config,
        task="pretrain-" + objective.name,
        tokenizer_json=tokenizer.to_json(),
        extra_state={"token_cache": cache.key, **({"before_metrics": before} if before is not None else {})},
        extra_results=extra,
        regularizers=[ewc] if ewc is not None else [],
    )
    if distiller is not None:
        distill.attach(job, distiller, teacher, evaluate, device)
    outcome = train(job, t, run_dir, resume=resume, stop_at=args.stop_at)
    final = outcome.results["metrics"].get("loss")
    if final is not None:
        verdict = "below" if final < entropy else "NOT below"
        say(f"val loss {final:.4f} is {verdict} the val tokens' unigram entropy {entropy:.4f}")
    return outcome
