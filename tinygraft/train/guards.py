"""The pitfalls the fine-tuning guides warn about, checked on every `finetune` run (issue 21).

Pure functions of the settings, the data's size and the metrics rows, each giving one sentence or None; `finetune`
prints each as `warning: ...` and keeps them under `warnings` in results.json.

    small_full    full fine-tuning on fewer than SMALL_DATA training examples: every weight of the model chasing a few
                  hundred labels overfits and swings from seed to seed; the probe or LoRA train a sliver of them.
                  Known before training, so said at the start, with the `advise` command that measures them.
    high_lr       a learning rate more than LR_FACTOR times the method's default on a pretrained model, with the loss
                  spike it caused: the first logged train loss against the highest before the third evaluation
    overfitting   the validation loss pulling away from the train loss: their gap growing over OVERFIT_EVALS
                  consecutive evaluations

A tokenizer or vocabulary that does not belong to the checkpoint is refused rather than warned about, where the
checkpoint is read (models/hf.py: check_tokenizer; train/runs.py for a tinygraft run): more tokens than embedding
rows, or another pad or end-of-text id, stops the run in one sentence before anything is written.
"""

import shlex

from tinygraft.train import distill, methods
from tinygraft.train.config import FinetuneConfig

SMALL_DATA = 500  # the guides' line below which a probe or LoRA usually beats full fine-tuning
LR_FACTOR = 10
OVERFIT_EVALS = 3
SPIKE_EVALS = 3  # the train rows up to this evaluation are where a too-high rate shows


def from_pretrained(cfg: FinetuneConfig) -> bool:
    """Whether the run starts from trained weights: always, except a distilled student built from a preset."""
    d = cfg.distill
    return d.teacher is None or d.student_from_teacher is not None or not distill.is_preset(d.student)


def method_default_lr(name: str) -> float | None:
    return methods.lookup(name)[0].default_lr


# ---------------------------------------------------------------------------------------------------- the guards
def small_full(method: str, n_train: int, command: str) -> str | None:
    if method != "full" or n_train >= SMALL_DATA:
        return None
    return (
        f"full fine-tuning on {n_train} training examples (fewer than {SMALL_DATA}) tends to overfit and to vary "
        f"from seed to seed; a linear probe or LoRA trains far fewer weights, so measure them here: {command}"
    )


def advise_command(cfg: FinetuneConfig, train: str, val: str | None) -> str:
    """The `tinygraft advise` on this run's data and columns: it measures the probe, LoRA and full fine-tuning here
    and prints the `compare` of them."""
    d = cfg.data
    parts = ["tinygraft", "advise", "--from", cfg.source]
    if cfg.task != "classify":
        parts += ["--task", cfg.task]
    parts += ["--train", train] + (["--val", val] if val is not None else [])
    for flag, value in (
        ("--text-col", d.text_col),
        ("--text-pair-col", d.text_pair_col),
        ("--label-col", d.label_col),
        ("--max-train", d.max_train),
        ("--max-val", d.max_val),
    ):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--max-length", str(d.max_length)]
    return " ".join(shlex.quote(p) for p in parts)


def loss_spike(rows: list[dict]) -> tuple[float, float, int] | None:
    """(the first logged train loss, the highest train loss up to the SPIKE_EVALS-th evaluation, its step)."""
    train = sorted((r for r in rows if r.get("split") == "train" and "loss" in r), key=lambda r: r["step"])
    evals = sorted(r["step"] for r in rows if r.get("split") == "val")
    horizon = evals[min(SPIKE_EVALS, len(evals)) - 1] if evals else float("inf")
    window = [r for r in train if r["step"] <= horizon]
    if not window:
        return None
    peak = max(window, key=lambda r: r["loss"])
    return window[0]["loss"], peak["loss"], peak["step"]


def high_lr(method: str, lr: float | None, default: float | None, pretrained: bool, rows: list[dict]) -> str | None:
    """`lr`: the rate the run stepped at (None when nothing stepped: a fitted probe)."""
    if lr is None or default is None or not pretrained or lr <= LR_FACTOR * default:
        return None
    spike = loss_spike(rows)
    if spike is None:
        seen = "no train loss was logged"
    elif spike[1] > spike[0]:
        seen = f"the train loss rose from {spike[0]:.4g} at first to {spike[1]:.4g} at step {spike[2]}"
    else:
        seen = f"the train loss did not rise above its first {spike[0]:.4g} this time"
    return (
        f"--lr {lr:g} is {lr / default:.0f}x {method}'s default {default:g} on a pretrained model, a rate that "
        f"can wreck what the model learned in pre-training ({seen}); try --lr {default:g}"
    )


def gaps(rows: list[dict]) -> list[tuple[int, float]]:
    """[(step, validation loss - train loss)] at each evaluation; the train loss is the mean of the rows logged since
    the previous evaluation (the last one before it when none was)."""
    train = sorted((r for r in rows if r.get("split") == "train" and "loss" in r), key=lambda r: r["step"])
    val = sorted((r for r in rows if r.get("split") == "val" and "loss" in r), key=lambda r: r["step"])
    out, previous = [], -1
    for v in val:
        since = [r["loss"] for r in train if previous < r["step"] <= v["step"]]
        before = [r["loss"] for r in train if r["step"] <= v["step"]]
        if since or before:
            out.append((v["step"], v["loss"] - (sum(since) / len(since) if since else before[-1])))
        previous = v["step"]
    return out


def overfitting(rows: list[dict], patience: int | None) -> str | None:
    g = gaps(rows)
    for i in range(len(g) - OVERFIT_EVALS + 1):
        run = g[i : i + OVERFIT_EVALS]
        if all(a[1] < b[1] for a, b in zip(run, run[1:])):
            shown = ", ".join(f"{gap:.3f} at step {step}" for step, gap in run)
            advice = (
                f"--patience {patience} is on and stops the run that many evaluations after its best"
                if patience
                else "--patience N stops a run N evaluations after its best"
            )
            return (
                f"the validation loss pulled away from the train loss over {OVERFIT_EVALS} evaluations in a row "
                f"(gap {shown}): the model is overfitting its training set; {advice}, and results.json keeps the "
                "best checkpoint"
            )
    return None


# -------------------------------------------------------------------------------------------- what finetune calls
def before_training(cfg: FinetuneConfig, n_train: int, train: str, val: str | None) -> list[str]:
    found = small_full(cfg.method, n_train, advise_command(cfg, train, val)) if cfg.distill.teacher is None else None
    return [found] if found else []


def after_training(cfg: FinetuneConfig, lr: float | None, rows: list[dict]) -> list[str]:
    """`lr`: the rate the run stepped at, None when nothing stepped."""
    found = [
        high_lr(cfg.method, lr, method_default_lr(cfg.method), from_pretrained(cfg), rows),
        overfitting(rows, cfg.train.patience),
    ]
    return [f for f in found if f]
