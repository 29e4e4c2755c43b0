"""`tinygraft pretrain`: config -> corpus -> tokenizer -> token cache -> batcher -> model -> the loop.

GPT presets train a causal language model (predict token t+1 from tokens <= t); BERT presets train a masked
language model (predict the 15% of tokens the batcher chose, from both sides). Everything specific to the two lives
in `causal_lm_*` / `mlm_*`; the loop (train/loop.py) is the same.

`--from PATH` continues pre-training from a pretrained directory or another run (train/sources.py): its weights,
its tokenizer and its model settings (a preset or `model.*` setting that changes the architecture is refused by
name). `--method lora` trains low-rank adapters over a frozen base (train/lora_method.py); over a Hugging Face
directory its checkpoints hold only the adapter and the base's path and sha256.
"""

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygraft.core import checkpoint
from tinygraft.data.batching import CausalLMBatcher, MLMBatcher, eval_batches
from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.kernels.backend import describe
from tinygraft.models.presets import build_model, family
from tinygraft.train import config as C
from tinygraft.train.loop import Job, Outcome, resolve_device, rng_preserved, seed_everything, train
from tinygraft.train.methods import Full, Method, get_method
from tinygraft.train.run_dir import RunDir
from tinygraft.train.sources import Source, load_source, resolve_source


# ------------------------------------------------------------------------------------------------ checks
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


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the tokens' own frequency distribution: the loss of the best context-free predictor."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------ the two jobs
def causal_lm_loss(model, batch):
    x, y = batch
    return model(x, y)[1]


def causal_lm_eval(val: np.ndarray, batch_size: int, seq_len: int, max_batches: int, device):
    def evaluate(model) -> dict:
        total, count = 0.0, 0
        for x, y in eval_batches(val, batch_size, seq_len, max_batches):
            loss = model(x.to(device), y.to(device))[1]
            total, count = total + float(loss) * y.numel(), count + y.numel()
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return evaluate


def mlm_loss(model, batch):
    return model(**batch)[1]


def mlm_eval(val: np.ndarray, tokenizer, batch_size: int, seq_len: int, max_batches: int, mask_prob: float, device):
    def evaluate(model) -> dict:
        # A fresh batcher with a fixed seed each time: every evaluation scores the same masked positions.
        batcher = MLMBatcher(val, batch_size, seq_len, tokenizer, seed=0, mask_prob=mask_prob)
        total, count = 0.0, 0
        for _ in range(max_batches):
            batch = {k: v.to(device) for k, v in batcher.next().items()}
            n = int((batch["labels"] != -100).sum())
            if n:
                total, count = total + float(model(**batch)[1]) * n, count + n
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return evaluate


# ------------------------------------------------------------------------------------------------ the command
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
    seed: int | None = None
    keep: int | None = None
    sets: list[str] | None = None
    from_: str | None = None  # --from: a Hugging Face directory, 'minilm', or a tinygraft run or checkpoint
    new_head: bool = False  # --new-head: give a BERT source without a masked-LM head a fresh one
    method: str | None = None  # full (default) or lora
    lora: dict | None = None  # the --lora-* settings given: {"r": 4, "alpha": ..., "targets": ...}; absent = default


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lora_defaults() -> dict:
    """The --lora-* defaults (lora_cli's), as LoRAMethod keyword arguments."""
    import argparse

    from tinygraft.train.lora_cli import add_lora_arguments, lora_settings_from_args

    parser = argparse.ArgumentParser(add_help=False)
    add_lora_arguments(parser)
    return lora_settings_from_args(parser.parse_args([]))


def resolve_from(source: Source, file: dict | None, flags: dict, sets: list[str] | None):
    """(RunConfig, model config) of a new run `--from` a source: the model settings are the source's."""
    from tinygraft.core.config import to_dict
    from tinygraft.models.presets import get_preset

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
    method = C.requested("method", file, flags, sets) or "full"
    base = {
        "preset": asked or ("gpt2" if fam == "gpt" else "bert-base"),  # names the model family; "model" has the rest
        "source": str(source.path),
        "new_head": bool(source.new_heads),
        "model": to_dict(src_cfg),
        "train": {"lr": C.FROM_LR.get(str(method), C.FROM_LR["full"]),
                  "seq_len": min(C.TrainConfig.seq_len, positions(src_cfg))},  # fmt: skip
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
    return dataclasses.replace(run, source=str(source.path), new_head=bool(source.new_heads)), model_cfg


def build_method(run: C.RunConfig, lora_given: dict, source: Source | None, resume) -> tuple[Method, C.RunConfig]:
    """The method object and the run config with its `method_settings` (what --resume compares)."""
    if run.method not in ("full", "lora"):
        raise TinygraftError(f"pretrain trains with --method full or lora, not {run.method!r}")
    if run.method == "full":
        if lora_given:
            flag = {"use_rslora": "rslora"}.get(next(iter(lora_given)), next(iter(lora_given)))
            raise TinygraftError(f"--lora-{flag} applies only with --method lora")
        return Full(), dataclasses.replace(run, method_settings={})
    from types import SimpleNamespace

    from tinygraft.train.lora_cli import lora_method_from_args
    from tinygraft.train.lora_method import LoRAMethod

    if resume is not None:
        saved = resume.config.get("method_settings") or {}
        keep = {k: saved[k] for k in ("r", "alpha", "dropout", "targets", "use_rslora") if k in saved}
        wanted = LoRAMethod(**{**lora_defaults(), **keep, **lora_given}, base_path=saved.get("base"))
        return LoRAMethod.from_checkpoint(resume.path), dataclasses.replace(run, method_settings=wanted.describe())
    if source is not None and source.new_heads:
        raise TinygraftError(
            "--method lora freezes the base, so the fresh masked-LM head of --new-head would never train; pre-train "
            "it with --method full first, or start from a BERT that has one"
        )
    settings = {**lora_defaults(), **lora_given}
    args = SimpleNamespace(lora_r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                           lora_targets=settings["targets"], lora_rslora=settings["use_rslora"])  # fmt: skip
    base = source.base_file if source is not None else None
    method = lora_method_from_args(args, base_path=base)
    method.find_base = False  # a base with no file of its own (a preset, a run) is kept whole in each checkpoint
    return method, dataclasses.replace(run, method_settings=method.describe())


def initial_model(model_cfg, source: Source | None, method: Method):
    """The model before training: the source's weights, or on resume the frozen base a LoRA checkpoint lacks (the
    loop then loads the checkpoint's tensors), or a fresh initialisation. Built from `model_cfg` so a changed
    dropout takes effect."""
    model = build_model(model_cfg)
    if source is not None:
        model.load_state_dict(source.model.state_dict())
    elif getattr(method, "base_sha256", None) is not None and method.base_path is not None:
        from tinygraft.models import hf
        from tinygraft.train.lora_method import check_base

        check_base(method.base_path, method.base_sha256)
        base, _ = hf.load_pretrained_model(method.base_path, "gpt" if family(model_cfg) == "gpt" else "mlm")
        model.load_state_dict(base.state_dict())
    return model


def pretrain(args: PretrainArgs) -> Outcome:
    from tinygraft.core.config import load_toml

    run_dir = RunDir(args.out)
    flags = {"preset": args.preset, "data.corpus": args.data, "train.steps": args.steps, "train.device": args.device,
             "train.seed": args.seed, "train.keep": args.keep, "method": args.method}
    flags = {k: v for k, v in flags.items() if v is not None}
    lora_given = {k: v for k, v in (args.lora or {}).items() if v is not None}
    file = load_toml(args.config) if args.config else None
    if args.stop_at is not None and args.stop_at < 1:
        raise TinygraftError(f"--stop-at must be at least 1, got {args.stop_at}")
    if args.new_head and args.from_ is None and not args.resume:
        raise TinygraftError("--new-head applies to a BERT loaded with --from; a model built from a preset has one")
    run_dir.check(resume=args.resume, overwrite=args.overwrite)  # (an old run is deleted only once all is checked)

    resume, source, tokenizer = None, None, None
    if args.resume:
        resume = checkpoint.load(run_dir.path)
        saved = resume.config
        if args.from_ is not None:
            flags["source"] = str(resolve_source(args.from_))  # a different source is refused below, by name
        run, model_cfg = C.resolve(saved, file, flags, args.sets)
        # The saved settings with today's defaults filled in (a run saved before a setting existed has none); checked
        # before the method is rebuilt (a changed --method) and after (changed --lora-* settings).
        saved_full = C.full_dict(*C.resolve(saved, None, {}, None))
        C.refuse_changes(saved_full, C.full_dict(run, model_cfg))
        method, run = build_method(run, lora_given, None, resume)
        C.refuse_changes(saved_full, C.full_dict(run, model_cfg))
        if resume.tokenizer_path is None:
            raise TinygraftError(f"checkpoint {str(resume.path)!r} is incomplete: tokenizer.json is missing")
        tokenizer = TextTokenizer.load(resume.tokenizer_path)
        say(f"resuming {str(run_dir.path)!r} from step {resume.step} of {run.train.steps}")
    elif args.from_ is not None:
        source = load_source(args.from_, new_head=args.new_head)
        for note in source.notes:
            say(f"note: {note}")
        run, model_cfg = resolve_from(source, file, flags, args.sets)
        method, run = build_method(run, lora_given, source, None)
        tokenizer = source.tokenizer
    else:
        run, model_cfg = C.resolve(None, file, flags, args.sets)
        method, run = build_method(run, lora_given, None, None)
    if args.stop_at is not None and args.stop_at > run.train.steps:
        raise TinygraftError(f"--stop-at {args.stop_at} is beyond the run's {run.train.steps} steps")

    fam = family(model_cfg)
    documents = read_corpus(run.data.corpus, run.data.text_field)
    if tokenizer is None:
        if run.data.tokenizer:
            tokenizer = TextTokenizer.load(run.data.tokenizer)
        else:
            kind = "bpe" if fam == "gpt" else "wordpiece"
            tokenizer = TextTokenizer.train(documents, kind=kind, vocab_size=run.data.vocab_size)
    # A checkpoint's embedding (resumed or --from) keeps its rows; only a new model takes the tokenizer's size.
    fixed = {"vocab_size"} if resume or source else C.explicit_model_keys(file, args.sets)
    model_cfg = check_fit(run, model_cfg, tokenizer, fixed)
    cache = TokenCache.build(documents, tokenizer, val_fraction=run.data.val_fraction)
    if resume and resume.trainer_state.get("token_cache", cache.key) != cache.key:
        raise TinygraftError(
            f"the corpus {run.data.corpus or 'pydoc_data.topics'!r} changed since the checkpoint was written, so the "
            "run cannot continue exactly; restore it or start a new run"
        )
    if len(cache.val) < 2:
        raise TinygraftError("the corpus is too small to hold out validation tokens; give it more text")
    config = C.full_dict(run, model_cfg)
    device = resolve_device(run.train.device)
    run_dir.prepare(resume=args.resume, overwrite=args.overwrite)
    if not resume:
        run_dir.write_config(config)

    t = run.train
    seed_everything(t.seed)
    model = initial_model(model_cfg, source, method)
    eval_len = min(t.seq_len, len(cache.val) - 1)
    if fam == "gpt":
        batcher = CausalLMBatcher(cache.train, t.batch_size, t.seq_len, seed=t.seed)
        loss_fn, count = causal_lm_loss, (lambda b: b[0].numel())
        evaluate = causal_lm_eval(cache.val, t.batch_size, eval_len, t.eval_batches, device)
    else:
        batcher = MLMBatcher(cache.train, t.batch_size, t.seq_len, tokenizer, seed=t.seed, mask_prob=run.data.mask_prob)
        loss_fn, count = mlm_loss, (lambda b: int(b["attention_mask"].sum()))
        evaluate = mlm_eval(cache.val, tokenizer, t.batch_size, t.seq_len, t.eval_batches, run.data.mask_prob, device)
    entropy = unigram_entropy(cache.val)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    origin = f"from {run.source}" if run.source else run.preset
    say(
        f"{origin} ({fam}, {n_params:,} parameters, method {run.method}), {tokenizer.kind} vocab "
        f"{tokenizer.vocab_size}, {len(cache.train):,} train / {len(cache.val):,} val tokens, device {device}, "
        f"kernels: {describe()}"
    )
    say(f"unigram entropy of the val tokens: {entropy:.4f} nats (a model must beat this to use context)")
    extra = {"val_unigram_entropy": entropy, "val_tokens": int(len(cache.val)), "preset": run.preset,
             "source": run.source}  # fmt: skip
    if source is not None:  # where continued pre-training starts: the source's own validation loss
        model.to(device).eval()
        with rng_preserved(), torch.no_grad():
            extra["source_metrics"] = {k: float(v) for k, v in evaluate(model).items()}
        say(f"the source's val loss before training: {extra['source_metrics']['loss']:.4f}")
    job = Job(
        model=model,
        method=method,
        batcher=batcher,
        loss_fn=loss_fn,
        evaluate=evaluate,
        count_tokens=count,
        config=config,
        task="pretrain-" + ("causal-lm" if fam == "gpt" else "mlm"),
        tokenizer_json=tokenizer.to_json(),
        extra_state={"token_cache": cache.key},
        extra_results=extra,
    )
    outcome = train(job, t, run_dir, resume=resume, stop_at=args.stop_at)
    final = outcome.results["metrics"].get("loss")
    if final is not None:
        verdict = "below" if final < entropy else "NOT below"
        say(f"val loss {final:.4f} is {verdict} the val tokens' unigram entropy {entropy:.4f}")
    return outcome


# ------------------------------------------------------------------------------------------------ loading a run
@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: TextTokenizer
    ckpt: checkpoint.Checkpoint
    run: C.RunConfig
    model_cfg: object
    unused: list[str]  # checkpoint tensors accepted but not used by the model


def load_trained(path: str | Path, device: torch.device, which: str = "latest") -> Trained:
    """A checkpoint (run dir, checkpoints/ dir or step dir) as a ready model in eval mode, with its tokenizer; a
    LoRA checkpoint comes back as its base with the adapter attached (unmerged)."""
    from tinygraft.core.config import from_dict
    from tinygraft.models.presets import get_preset

    ckpt = checkpoint.load(path, which, with_optimizer=False)
    if ckpt.tokenizer_path is None:
        raise TinygraftError(f"checkpoint {str(ckpt.path)!r} is incomplete: tokenizer.json is missing")
    saved = dict(ckpt.config)
    model_dict = saved.pop("model", None)
    if model_dict is None:
        raise TinygraftError(f"checkpoint {str(ckpt.path)!r} has no model settings in its config.json")
    run = from_dict(C.RunConfig, saved)
    model_cfg = from_dict(type(get_preset(run.preset)), model_dict, "model")
    from tinygraft.train.lora_method import BASE_FILE, load_lora_model  # (also registers the "lora" method)

    if (ckpt.path / BASE_FILE).is_file():  # a LoRA run: the adapter over its base (read again, hash checked)
        model, _ = load_lora_model(ckpt.path, ckpt.model, ckpt.config)
        unused = []
    else:
        model = build_model(model_cfg)
        method = get_method(run.method)
        model = method.attach(model)
        unused = method.load_state_dict(model, ckpt.model)
    tokenizer = TextTokenizer.load(ckpt.tokenizer_path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TinygraftError(
            f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"{model_cfg.vocab_size}"
        )
    return Trained(model.to(device).eval(), tokenizer, ckpt, run, model_cfg, unused)
