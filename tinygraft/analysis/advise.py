"""`tinygraft advise`: the inputs of the when-to-fine-tune decision, measured on the user's data and machine.

    the data       labeled examples (per class), label balance, token lengths against the model's positions
    the domain     pieces per word and the unknown-token rate against a reference text (the default corpus unless
                   --reference), and, when the checkpoint has an LM head, its LM loss on both
    the model      zero-shot and the converged linear probe (classify), on the validation split
    the costs      a few timed optimizer steps of full fine-tuning and LoRA (the probe: its fit), extrapolated to
                   the whole training set, and each run's peak memory against the device's

Every trained measurement is a `finetune` process of its own (train/compare.py: run_one), so its peak memory is its
own and a rerun with the same settings reuses it; they run one after another, so none slows another. The
decision itself is analysis/advice.py. Caps (said in the output): CAP examples for the probe and zero-shot, WARMUP +
TIMED_STEPS steps per timed method.
"""

import dataclasses
import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tinygraft.analysis import advice as A
from tinygraft.core.checkpoint import atomic_write
from tinygraft.data.corpus import read_corpus
from tinygraft.errors import TinygraftError
from tinygraft.models.gpt import GPT
from tinygraft.models.pretrained import is_language_model, resolve_pretrained
from tinygraft.tasks import get_task
from tinygraft.tasks.lm import objective_for
from tinygraft.train import compare as C
from tinygraft.train import runs
from tinygraft.train.config import FinetuneConfig
from tinygraft.train.finetune import subset, with_demo
from tinygraft.train.loop import resolve_device

CAP = 2_000  # examples the probe and zero-shot read, of the training and of the validation split
WARMUP = 2  # untimed steps first: allocation and the first kernels' warm-up
TIMED_STEPS = 10
LM_TOKENS = 32_768  # tokens of each text the LM loss reads
REFERENCE_WORDS = 200_000


# ------------------------------------------------------------------------------------------------------ the data
def texts_of(example) -> list[str]:
    """The text an example holds, whatever its task: classify's text and pair, QA's question and context, ..."""
    out = []
    for value in vars(example).values():
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out.append(" ".join(value))
    return out


def label_counts(examples: list) -> dict[str, int] | None:
    labels = [ex.label for ex in examples if hasattr(ex, "label")]
    if not labels or any(isinstance(lb, float) for lb in labels):  # regression scores have no classes
        return None
    flat = [str(x) for lb in labels for x in (lb if isinstance(lb, list) else [lb])]
    return dict(sorted(Counter(flat).items(), key=lambda kv: -kv[1]))


def length_stats(lengths: list[int], positions: int, max_length: int) -> dict:
    a = np.asarray(lengths)
    return {
        "tokens_p50": float(np.percentile(a, 50)),
        "tokens_p95": float(np.percentile(a, 95)),
        "tokens_max": int(a.max()),
        "positions": positions,
        "max_length": max_length,
        "over_max_length": float((a > max_length).mean()),  # what truncation cuts (the specials add a few more)
        "over_positions": float((a > positions).mean()),
    }


def data_report(examples: list, tokenizer, positions: int, max_length: int) -> dict:
    texts = [" ".join(texts_of(ex)) for ex in examples]
    counts = label_counts(examples)
    report = {"examples": len(examples), "per_class": counts}
    if counts:
        report["balance"] = min(counts.values()) / max(counts.values())  # smallest class over the largest
    report.update(length_stats([len(ids) for ids in tokenizer.encode_batch(texts)], positions, max_length))
    return report


# ---------------------------------------------------------------------------------------------------- the domain
def fragmentation(texts: list[str], tokenizer, max_words: int = REFERENCE_WORDS) -> dict:
    """Pieces per whitespace word, and the share of tokens that are the unknown token."""
    words, kept = 0, []
    for t in texts:
        kept.append(t)
        words += len(t.split())
        if words >= max_words:
            break
    ids = [i for row in tokenizer.encode_batch(kept) for i in row]
    unk = sum(i == tokenizer.unk_id for i in ids) if tokenizer.unk_id is not None else 0
    return {"words": words, "pieces_per_word": len(ids) / max(words, 1), "unk_rate": unk / max(len(ids), 1)}


def token_stream(texts: list[str], tokenizer, limit: int = LM_TOKENS) -> np.ndarray:
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    out: list[int] = []
    for row in tokenizer.encode_batch(texts):
        out += row + ([sep] if sep is not None else [])
        if len(out) >= limit:
            break
    return np.asarray(out[:limit], dtype=np.int64)


@torch.no_grad()
def lm_loss(model, family: str, tokens: np.ndarray, tokenizer, positions: int, device) -> float:
    seq = min(128, positions, len(tokens) - 1)
    if seq < 8:
        raise TinygraftError("the text is too short to measure an LM loss on (fewer than 9 tokens)")
    was = model.training
    model.eval()
    loss = objective_for(family).evaluator(tokens, tokenizer, 16, seq, 16, 0.15, device)(model)["loss"]
    model.train(was)
    return loss


def domain_report(texts: list[str], reference: list[str], loaded, tokenizer, positions: int, device) -> dict:
    own, ref = fragmentation(texts, tokenizer), fragmentation(reference, tokenizer)
    report = {"text": own, "reference": ref, "lm_loss": None, "reference_lm_loss": None}
    model = loaded.model
    if is_language_model(model):
        family = "gpt" if isinstance(model, GPT) else "bert"
        model.to(device)
        report["lm_loss"] = lm_loss(model, family, token_stream(texts, tokenizer), tokenizer, positions, device)
        report["reference_lm_loss"] = lm_loss(model, family, token_stream(reference, tokenizer), tokenizer,
                                              positions, device)  # fmt: skip
    else:
        report["lm_note"] = "not measured: the checkpoint has no LM head (MiniLM's sentence encoder has none)"
    report["gap"] = A.domain_gap(own["pieces_per_word"], ref["pieces_per_word"], own["unk_rate"],
                                 report["lm_loss"], report["reference_lm_loss"])  # fmt: skip
    return report


# ------------------------------------------------------------------------------------------------------ the runs
def child(cfg: FinetuneConfig, method: str, given: dict, **changes) -> FinetuneConfig:
    """One measuring run's settings: `cfg` with the method, its default rate, and the data and train changes."""
    lr = C.lr_of(method, {}, cfg.train.lr)
    c = C.child_config(cfg, method, cfg.train.seed, lr, given)
    data = {k[5:]: v for k, v in changes.items() if k.startswith("data_")}
    train = {k[6:]: v for k, v in changes.items() if k.startswith("train_")}
    return dataclasses.replace(c, data=dataclasses.replace(c.data, **data), train=dataclasses.replace(c.train, **train))


def timed(cfg: FinetuneConfig, method: str, given: dict, out: Path, threads, overwrite: bool) -> dict:
    """A few optimizer steps of `method`: (the median step's seconds after WARMUP, the run's results)."""
    steps = WARMUP + TIMED_STEPS
    c = child(cfg, method, given, train_steps=steps, train_epochs=1, train_log_every=1, train_eval_every=steps,
              train_patience=None, data_max_train=min(cfg.data.max_train or CAP, CAP),
              data_max_val=cfg.train.eval_batch_size)  # fmt: skip
    results = C.run_one(c, out / "runs" / f"{method}-timed", out / "logs" / f"{method}-timed.log", threads, overwrite)
    rows = [r for r in metrics_rows(out / "runs" / f"{method}-timed") if r.get("split") == "train"]
    elapsed = [r["elapsed_s"] for r in rows]
    diffs = [b - a for a, b in zip(elapsed[WARMUP - 1 :], elapsed[WARMUP:])]
    return {"step_seconds": statistics.median(diffs) if diffs else results["train_seconds"] / steps, **results}


def metrics_rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def scored(cfg: FinetuneConfig, method: str, given: dict, out: Path, threads, overwrite: bool) -> dict:
    c = child(cfg, method, given, data_max_train=min(cfg.data.max_train or CAP, CAP),
              data_max_val=min(cfg.data.max_val or CAP, CAP))  # fmt: skip
    return C.run_one(c, out / "runs" / method, out / "logs" / f"{method}.log", threads, overwrite)


def trial(cfg: FinetuneConfig, given: dict, epochs: int, steps_per_epoch: int, out: Path, threads, overwrite) -> dict:
    """LoRA as the tree would run it, on the whole (small) training set: what the probe is measured against."""
    c = child(cfg, "lora", given, train_epochs=epochs, train_eval_every=A.eval_interval(epochs, steps_per_epoch),
              data_max_val=min(cfg.data.max_val or CAP, CAP))  # fmt: skip
    return C.run_one(c, out / "runs" / "lora", out / "logs" / "lora.log", threads, overwrite)


def device_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def costs(cfg, given, n_train: int, out: Path, threads, overwrite, device, probe: dict | None) -> dict:
    """{method: advice.Cost}: full and LoRA timed, the probe from its fit (or timed, where it steps)."""
    total = device_memory_mb(device)
    steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
    out_costs, runs_ = {}, {}
    fitted = probe is not None and (probe.get("probe") or {}).get("fit") == "lbfgs"
    methods = ["full", "lora"] + ([] if fitted else ["linear-probe"])
    for m in methods:
        r = timed(cfg, m, given, out, threads, overwrite)
        runs_[m] = r
        fits = r["peak_memory_mb"] <= A.MEMORY_SHARE * total
        out_costs[m] = A.Cost(r["step_seconds"], r["peak_memory_mb"], fits, r["step_seconds"] * steps_per_epoch)
    if "linear-probe" not in out_costs and probe is not None:
        fit = probe["probe"]
        per_example = (fit["features_seconds"] + fit["fit_seconds"]) / fit["examples"]
        fits = probe["peak_memory_mb"] <= A.MEMORY_SHARE * total
        out_costs["linear-probe"] = A.Cost(per_example, probe["peak_memory_mb"], fits, per_example * n_train, "example")
    return {"costs": out_costs, "device_memory_mb": total, "steps_per_epoch": steps_per_epoch}


# -------------------------------------------------------------------------------------------------- the whole
def advise(cfg: FinetuneConfig, out: Path, reference: str | None, budget_minutes: float | None, given: dict,
           threads: int | None = None, overwrite: bool = False, say=print) -> dict:  # fmt: skip
    """Every measurement, the recommendation (advice.Advice) and what went into it, as one JSON-able report."""
    if budget_minutes is not None and not budget_minutes > 0:
        raise TinygraftError(f"--budget-minutes must be a positive number, got {budget_minutes}")
    path = resolve_pretrained(runs.in_run(Path.cwd(), cfg.source))
    if not path.exists():
        raise TinygraftError(f"--from {cfg.source!r} is neither a directory nor a known model name (try 'minilm')")
    loaded = runs.load(path)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise TinygraftError(f"--from '{cfg.source}' has no tokenizer")
    backbone = getattr(loaded.model, "backbone", None) or getattr(loaded.model, "bert", None) or loaded.model
    config = backbone.config
    positions = getattr(config, "max_position_embeddings", None) or config.block_size
    device = resolve_device(cfg.train.device)
    task = get_task(cfg.task)
    seen = with_demo(cfg, out / "data")  # (the runs below write the demo into their own directories)
    data = dataclasses.replace(seen.data, train=runs.in_run(out / "data", seen.data.train),
                               val=runs.in_run(out / "data", seen.data.val))  # fmt: skip
    train_ex = subset(task.read_training(data, cfg.task_settings), data.max_train)
    if not train_ex:
        raise TinygraftError(f"training file '{data.train}' holds no examples")
    say(f"advise: {len(train_ex):,} training examples; measuring the data and the domain")
    report: dict = {"source": cfg.source, "task": cfg.task, "caps": caps_line()}
    report["data"] = data_report(train_ex, tokenizer, positions, cfg.data.max_length)
    texts = [" ".join(texts_of(ex)) for ex in train_ex]
    ref_texts = read_corpus(reference)
    report["domain"] = domain_report(texts, ref_texts, loaded, tokenizer, positions, device)
    report["domain"]["reference_name"] = reference or "the default corpus (pydoc_data.topics)"
    del loaded
    metric, higher = task.metric(cfg.task_settings)
    scores, probe = {}, None
    if cfg.task == "classify" and cfg.task_settings.problem != "regression":
        for m in ("zero-shot", "linear-probe"):
            say(f"advise: {m} on up to {CAP:,} examples")
            r = scored(cfg, m, given, out, threads, overwrite)
            scores[m] = r["metrics"][r["metric"]]
            probe = r if m == "linear-probe" else probe
    say(f"advise: timing {WARMUP} + {TIMED_STEPS} steps of full fine-tuning and LoRA")
    c = costs(cfg, given, len(train_ex), out, threads, overwrite, device, probe)
    epochs = A.epochs_for(len(train_ex), cfg.train.batch_size)
    lora = c["costs"]["lora"].seconds(epochs)
    budget = budget_minutes * 60 if budget_minutes else None
    if scores and A.runs_trial(len(train_ex), cfg.train.batch_size, lora, budget):
        say(f"advise: LoRA for {epochs} epochs (estimated {A._duration(lora)}): is the probe enough?")
        r = trial(cfg, given, epochs, c["steps_per_epoch"], out, threads, overwrite)
        scores["lora"] = r["metrics"][r["metric"]]
        report["trial"] = {"method": "lora", "epochs": epochs, "run": str(out / "runs" / "lora"),
                           "train_seconds": r.get("train_seconds_excl_eval", r["train_seconds"])}  # fmt: skip
    report["scores"] = scores
    report["metric"] = metric
    report["costs"] = {m: dataclasses.asdict(v) for m, v in c["costs"].items()}
    report["steps_per_epoch"] = c["steps_per_epoch"]
    report["device"] = {"type": device.type, "memory_mb": c["device_memory_mb"]}
    measured = A.Measured(len(train_ex), cfg.train.batch_size, metric, scores, c["costs"], report["domain"]["gap"],
                          budget, higher)  # fmt: skip
    report["advice"] = dataclasses.asdict(A.recommend(measured))
    report["advice"]["lr"] = C.lr_of(report["advice"]["method"], {}, cfg.train.lr)
    report["thresholds"] = thresholds()
    if report["advice"]["pretrain_first"]:  # the text the printed `pretrain --from` command reads
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "domain.txt", "\n\n".join(texts) + "\n")
    return report


def caps_line() -> str:
    return (
        f"caps: the probe and zero-shot read at most {CAP:,} training and {CAP:,} validation examples; full and "
        f"LoRA are timed over {TIMED_STEPS} steps after {WARMUP} untimed; the LM loss reads {LM_TOKENS:,} tokens; "
        f"below {A.FEATURES_BELOW:,} examples LoRA runs whole where it is at most {A.TRIAL_STEPS} steps (and within "
        f"the budget)"
    )


def thresholds() -> dict:
    names = ("PROMPT_BELOW", "FEATURES_BELOW", "FULL_FROM", "MIN_STEPS", "MAX_EPOCHS", "TRIAL_STEPS", "MEMORY_SHARE",
             "PIECES_RATIO", "UNK_RATE", "LM_GAP")  # fmt: skip
    return {n.lower(): getattr(A, n) for n in names}
