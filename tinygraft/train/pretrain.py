"""`tinygraft pretrain`: config -> corpus -> tokenizer -> token cache -> batcher -> model -> the loop.

GPT presets train a causal language model (predict token t+1 from tokens <= t); BERT presets train a masked
language model (predict the 15% of tokens the batcher chose, from both sides). Everything specific to the two lives
in `causal_lm_job` / `mlm_job`; the loop (train/loop.py) is the same.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygraft.core import checkpoint
from tinygraft.core.batching import CausalLMBatcher, MLMBatcher, eval_batches
from tinygraft.core.data import TokenCache, read_corpus
from tinygraft.core.errors import TinygraftError
from tinygraft.core.tokenizer import TextTokenizer
from tinygraft.kernels.backend import describe
from tinygraft.models.presets import build_model, family
from tinygraft.train import config as C
from tinygraft.train.loop import Job, Outcome, resolve_device, seed_everything, train
from tinygraft.train.methods import get_method
from tinygraft.train.run_dir import RunDir


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


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pretrain(args: PretrainArgs) -> Outcome:
    from tinygraft.core.config import load_toml

    run_dir = RunDir(args.out)
    flags = {"preset": args.preset, "data.corpus": args.data, "train.steps": args.steps, "train.device": args.device,
             "train.seed": args.seed, "train.keep": args.keep}
    flags = {k: v for k, v in flags.items() if v is not None}
    file = load_toml(args.config) if args.config else None
    if args.stop_at is not None and args.stop_at < 1:
        raise TinygraftError(f"--stop-at must be at least 1, got {args.stop_at}")
    run_dir.check(resume=args.resume, overwrite=args.overwrite)  # (an old run is deleted only once all is checked)

    resume = None
    if args.resume:
        resume = checkpoint.load(run_dir.path)
        saved = resume.config
        run, model_cfg = C.resolve(saved, file, flags, args.sets)
        C.refuse_changes(saved, C.full_dict(run, model_cfg))
        if resume.tokenizer_path is None:
            raise TinygraftError(f"checkpoint {str(resume.path)!r} is incomplete: tokenizer.json is missing")
        tokenizer = TextTokenizer.load(resume.tokenizer_path)
        say(f"resuming {str(run_dir.path)!r} from step {resume.step} of {run.train.steps}")
    else:
        run, model_cfg = C.resolve(None, file, flags, args.sets)
        tokenizer = None
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
    model_cfg = check_fit(run, model_cfg, tokenizer, C.explicit_model_keys(file, args.sets) if not resume else set())
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
    model = build_model(model_cfg)
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
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"{run.preset} ({fam}, {n_params:,} parameters), {tokenizer.kind} vocab {tokenizer.vocab_size}, "
        f"{len(cache.train):,} train / {len(cache.val):,} val tokens, device {device}, kernels: {describe()}"
    )
    say(f"unigram entropy of the val tokens: {entropy:.4f} nats (a model must beat this to use context)")
    job = Job(
        model=model,
        method=get_method(run.method),
        batcher=batcher,
        loss_fn=loss_fn,
        evaluate=evaluate,
        count_tokens=count,
        config=config,
        task="pretrain-" + ("causal-lm" if fam == "gpt" else "mlm"),
        tokenizer_json=tokenizer.to_json(),
        extra_state={"token_cache": cache.key},
        extra_results={"val_unigram_entropy": entropy, "val_tokens": int(len(cache.val)), "preset": run.preset},
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
    """A checkpoint (run dir, checkpoints/ dir or step dir) as a ready model in eval mode, with its tokenizer."""
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
