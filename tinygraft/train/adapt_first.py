"""`finetune --adapt-first N`: task-adaptive pre-training (Gururangan et al. 2020, "Don't Stop Pretraining"): N
steps of the backbone's own language-model objective on the task's training text, then the fine-tuning.

The text is the training examples' tokens as the task read them (one document per example, special tokens
dropped), so nothing is read or tokenized twice; the validation examples' tokens are its held-out text. A GPT
trains through its tied LM head; a BERT gets a fresh masked-LM head (as `pretrain --new-head` gives one), tied to
its word embeddings and dropped afterwards, since fine-tuning never uses it.

The phase is a run of the one loop in RUN/adapt-first (progress, checkpoints, Ctrl-C, --resume). It trains the very
backbone the task model holds, so when it ends the fine-tuning starts from the adapted weights; the fine-tuning's
checkpoints hold them, and a resumed fine-tuning never repeats the phase (stopped during it, `--resume` finishes it
first).
"""

import dataclasses

import numpy as np
import torch

from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.tasks.lm import objective_for
from tinygraft.train import methods
from tinygraft.train.config import TrainConfig
from tinygraft.train.loop import Job, measure, resolve_device, rng_preserved, train
from tinygraft.train.run_dir import ADAPT_FIRST, RunDir


def interrupted(run_dir) -> bool:
    """A fine-tuning stopped in its --adapt-first phase: the phase's run is there, the fine-tuning's checkpoints not."""
    return (run_dir / ADAPT_FIRST).is_dir() and not (run_dir / "checkpoints").is_dir()


def token_stream(features: list[dict], tokenizer) -> np.ndarray:
    """Every example's tokens (each `*input_ids` field), special tokens dropped, each followed by the separator."""
    special, sep = tokenizer.special_ids, tokenizer.separator_id
    out: list[int] = []
    for f in features:
        for key, ids in f.items():
            if key.endswith("input_ids"):
                out += [t for t in ids if t not in special]
                out.append(sep)
    return np.asarray(out, dtype=np.int64)


def lm_of(backbone, seed: int):
    """The backbone as a language model: a GPT itself; a BERT inside a masked LM with a fresh head, tied."""
    if not isinstance(backbone, BERT):
        return backbone
    with torch.random.fork_rng():  # the head's init draws from its own seed, not the fine-tuning's streams
        torch.manual_seed(seed)
        return BERTForMaskedLM(backbone.config, bert=backbone)


def adapt(backbone, family: str, steps: int, lr: float, train_features, val_features, tokenizer, t, seq_len,
          run_dir, say) -> dict:  # fmt: skip
    """Train `backbone` in place for `steps` LM steps in run_dir/adapt-first: {status, steps, before, after}."""
    where = run_dir / ADAPT_FIRST
    text, held_out = token_stream(train_features, tokenizer), token_stream(val_features, tokenizer)
    seq_len = min(seq_len, len(text) - 1, len(held_out) - 1)
    if seq_len < 8:
        raise TinygraftError("--adapt-first needs more text: the task's training or validation examples hold too "
                             "few tokens for one window")  # fmt: skip
    objective = objective_for(family)
    model = lm_of(backbone, t.seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(True)
    cfg = TrainConfig(steps=steps, batch_size=t.batch_size, seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10),
                      schedule="linear", min_lr_ratio=0.0, weight_decay=0.01, beta2=0.999,
                      eval_every=max(1, steps // 4), eval_batches=5, keep=1, seed=t.seed, device=t.device,
                      optimizer=t.optimizer, precision=t.precision, tensorboard=t.tensorboard)  # fmt: skip
    device = resolve_device(t.device)
    evaluate = objective.evaluator(held_out, tokenizer, t.batch_size, seq_len, cfg.eval_batches, 0.15, device)
    status = "completed"
    # The phase leaves the RNG streams as it found them: a fine-tuning that skips it (it finished before a stop)
    # then draws what one that ran it draws.
    with RunDir(where) as sub, rng_preserved():
        done = (sub.read_results() or {}).get("status") == "completed"  # not an interrupted or stopped phase
        resume = checkpoint.load(where) if (where / "checkpoints").is_dir() else None
        if done:  # a fine-tuning stopped before its first checkpoint: the phase's final weights, not a second phase
            methods.make_method("full", None, "pretrain").load_state_dict(model, resume.model)
            results = dict(sub.read_results())
        else:
            sub.check(resume=resume is not None, overwrite=False)
            sub.prepare(resume=resume is not None, overwrite=False)
            config = {"kind": "adapt-first", "family": family, "train": dataclasses.asdict(cfg)}
            if resume is None:
                sub.write_config(config)
            say(f"--adapt-first: {steps} steps of the {objective.name} objective on the task's {len(text):,} "
                f"training tokens ({len(held_out):,} held out)")  # fmt: skip
            batcher = objective.batcher(text, t.batch_size, seq_len, tokenizer, t.seed, 0.15)
            before = resume.trainer_state["before"] if resume else measure(model, evaluate, device)
            job = Job(model=model, method=methods.make_method("full", None, "pretrain"), batcher=batcher,
                      loss_fn=objective.loss, evaluate=evaluate, count_tokens=objective.count_tokens,
                      loss_count=objective.loss_count, config=config, task="adapt-first-" + objective.name,
                      tokenizer_json=tokenizer.to_json(),
                      extra_results={"before": before}, extra_state={"before": before})  # fmt: skip
            outcome = train(job, cfg, sub, resume=resume)
            status, results = outcome.status, outcome.results
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    return {"status": status, "steps": steps, "before": results.get("before"), "after": results.get("metrics")}
