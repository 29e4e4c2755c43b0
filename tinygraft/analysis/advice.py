"""The when-to-fine-tune decision (`tinygraft advise`, issue 21): the guides' tree, fed with what was measured.

    labeled examples n         the tree's branch
    n < PROMPT_BELOW           prompt: no training (zero-shot)
    n < FEATURES_BELOW         feature extraction (the converged linear probe), then LoRA if it is not enough
    n < FULL_FROM              LoRA or full fine-tuning, whichever costs less here (measured)
    n >= FULL_FROM             full fine-tuning
    text unlike the model's    continued pre-training first (`pretrain --from`, or `finetune --adapt-first`)

What the measurements change, each said in the output:
- where the tree says prompt or probe, the validation scores decide: zero-shot's, the probe's and, when a LoRA run
  of the tree's epochs is estimated under TRIAL_SECONDS, that run's (advise runs it: the tree's "then LoRA if it is
  not enough", measured); the pick is the cheapest method within MARGIN of the best score, since they cost seconds
  and a guide's rule of thumb is no match for the number;
- a method whose estimated training time is above `--budget-minutes`, or whose measured peak memory is above the
  device's (MEMORY_SHARE of it), is passed over for the next one down LADDER, the cheapest last.

The learning rate is the method's default (train/methods/: the rates README's tables were measured with); the
epochs give at least MIN_STEPS optimizer steps (at most MAX_EPOCHS), since a few hundred examples at one epoch are a
handful of steps. Pure functions of the measurements: tests/analysis/test_advice.py walks every branch.
"""

import math
from dataclasses import dataclass, field

PROMPT_BELOW = 100
FEATURES_BELOW = 1_000
FULL_FROM = 10_000
MIN_STEPS = 100
MAX_EPOCHS = 20
MEMORY_SHARE = 0.9  # of the device's memory a run may take before it counts as not fitting
LADDER = ("full", "lora", "linear-probe", "zero-shot")  # the most capable first; each step down costs less
PIECES_RATIO = 1.5  # pieces per word against the reference's, above which the text counts as unlike the model's
UNK_RATE = 0.01  # unknown tokens per token
LM_GAP = 1.0  # nats per token of LM loss above the reference's
EVALS = 5  # evaluations a recommended run makes, at most
MARGIN = 0.01  # of the metric (1 point of accuracy): a cheaper method this close to the best is the pick
TRIAL_STEPS = 2 * MIN_STEPS  # below FEATURES_BELOW examples, advise runs LoRA whole when it is at most this many steps
NAMES = {"zero-shot": "zero-shot", "linear-probe": "the linear probe", "lora": "LoRA", "full": "full fine-tuning"}


@dataclass
class Cost:
    """A method's measured cost on this machine."""

    step_seconds: float  # per optimizer step (the probe: per example, features and fit)
    peak_mb: float
    fits: bool  # the peak is within MEMORY_SHARE of the device's memory
    epoch_seconds: float = 0.0  # one epoch over the whole training set, extrapolated
    unit: str = "step"  # what step_seconds is per: "step", or "example" for the fitted probe

    def seconds(self, epochs: int) -> float:
        return self.epoch_seconds * epochs


@dataclass
class Measured:
    n_train: int
    batch_size: int
    metric: str
    scores: dict[str, float] = field(default_factory=dict)  # measured validation scores: zero-shot, linear-probe
    costs: dict[str, Cost] = field(default_factory=dict)
    gap: list[str] = field(default_factory=list)  # why the text looks unlike the model's (empty: it does not)
    budget_seconds: float | None = None
    higher_is_better: bool = True


@dataclass
class Advice:
    method: str
    epochs: int
    branch: str  # the tree's branch, as a sentence with its threshold
    reasons: list[str]  # the measured reasons, one sentence each
    passed_over: dict[str, str]  # method -> why not
    pretrain_first: bool  # continued pre-training before fine-tuning
    train_epochs: int  # the epochs a stepped method (full, LoRA) would take here: what compare runs them for


def epochs_for(n_train: int, batch_size: int) -> int:
    steps_per_epoch = math.ceil(n_train / batch_size)
    return max(1, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))


def runs_trial(n_train: int, batch_size: int, lora_seconds: float, budget_seconds: float | None) -> bool:
    """Whether advise runs LoRA whole for the tree's epochs (below FEATURES_BELOW examples): counted in steps, not in
    this machine's seconds, so a loaded machine asks the same question as a quiet one; only the user's budget is in
    seconds. Below 1,000 examples at the default batch of 16 the tree's epochs come to at most 147 steps."""
    steps = epochs_for(n_train, batch_size) * math.ceil(n_train / batch_size)
    within_budget = budget_seconds is None or lora_seconds <= budget_seconds
    return n_train < FEATURES_BELOW and steps <= TRIAL_STEPS and within_budget


def eval_interval(epochs: int, steps_per_epoch: int) -> int | None:
    """Steps between evaluations for at most EVALS of them (None: the default, one an epoch): many epochs of a small
    training set would otherwise spend more time evaluating than training."""
    return math.ceil(epochs * steps_per_epoch / EVALS) if epochs > EVALS else None


def branch_of(n: int) -> tuple[str, str]:
    """(the tree's method, its branch as a sentence)."""
    if n < PROMPT_BELOW:
        return "zero-shot", f"{n:,} labeled examples, fewer than {PROMPT_BELOW}: prompt the model, train nothing"
    if n < FEATURES_BELOW:
        return "linear-probe", (
            f"{n:,} labeled examples, {PROMPT_BELOW}-{FEATURES_BELOW:,}: feature extraction (a linear probe on the "
            "frozen model), then LoRA if it is not enough"
        )
    if n < FULL_FROM:
        return "full", (
            f"{n:,} labeled examples, {FEATURES_BELOW:,}-{FULL_FROM:,}: LoRA or full fine-tuning, whichever costs "
            "less here"
        )
    return "full", f"{n:,} labeled examples, {FULL_FROM:,} or more: full fine-tuning"


def better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def recommend(m: Measured) -> Advice:
    pick, branch = branch_of(m.n_train)
    epochs = epochs_for(m.n_train, m.batch_size)
    reasons: list[str] = []
    if pick in ("zero-shot", "linear-probe") and m.scores:
        pick, why = _by_score(m, epochs)
        reasons.append(why)
    elif pick == "zero-shot":
        pick = "linear-probe"
        reasons.append("zero-shot scoring needs the classify task, so the cheapest trained method: the linear probe")
    elif pick == "full" and m.n_train < FULL_FROM and {"full", "lora"} <= set(m.costs):
        full, lora = (m.costs[x].seconds(epochs) for x in ("full", "lora"))
        pick = "lora" if lora <= full else "full"
        reasons.append(f"LoRA or full: {pick} costs less here (about {_duration(lora)} against {_duration(full)})")
    passed_over: dict[str, str] = {}
    ladder = [x for x in LADDER if x in m.costs or (x == "zero-shot" and "zero-shot" in m.scores)]
    start = ladder.index(pick) if pick in ladder else 0
    chosen = None
    for method in ladder[start:]:
        why = _cannot(method, m, epochs)
        if why is None:
            chosen = method
            break
        passed_over[method] = why
    if chosen is None:
        chosen = ladder[-1] if ladder else pick
        reasons.append(f"nothing fits every limit; {chosen} costs the least")
    for method, why in passed_over.items():
        reasons.append(f"not {method}: {why}")
    cost = m.costs.get(chosen)
    if cost is not None and chosen != "zero-shot":
        seconds = cost.seconds(_epochs(chosen, epochs))
        about = "" if seconds < 1 else "about "
        reasons.append(f"{chosen}: {about}{_duration(seconds)} of training here, peak memory {cost.peak_mb:,.0f} MB")
    if m.gap:
        reasons.append("the text is unlike the model's (" + "; ".join(m.gap) + "): continued pre-training first")
    return Advice(chosen, _epochs(chosen, epochs), branch, reasons, passed_over, bool(m.gap), epochs)


def _by_score(m: Measured, epochs: int) -> tuple[str, str]:
    """Where the tree says prompt or probe, what was scored decides: the cheapest method within MARGIN of the best
    score (the LoRA trial, when advise ran one, answers the tree's "then LoRA if it is not enough")."""
    cheapest_first = [x for x in reversed(LADDER) if x in m.scores]
    best = cheapest_first[0]
    for x in cheapest_first[1:]:
        best = x if better(m.scores[x], m.scores[best], m.higher_is_better) else best
    sign = 1 if m.higher_is_better else -1
    pick = next(x for x in cheapest_first if sign * (m.scores[best] - m.scores[x]) <= MARGIN)
    shown = ", ".join(f"{NAMES[x]} {m.scores[x]:.4f}" for x in cheapest_first)
    trial = f" (LoRA: a trial of {epochs} epochs)" if "lora" in m.scores else ""
    return pick, (
        f"measured on the validation split, {m.metric}: {shown}{trial}; the cheapest within {MARGIN:g} of the best: "
        f"{pick}"
    )


def _epochs(method: str, epochs: int) -> int:
    return 1 if method in ("zero-shot", "linear-probe") else epochs  # the probe is fitted, not stepped


def _cannot(method: str, m: Measured, epochs: int) -> str | None:
    """Why a method cannot be the pick here, or None."""
    if method == "zero-shot":
        return None
    cost = m.costs[method]
    if not cost.fits:
        return f"its measured peak memory, {cost.peak_mb:,.0f} MB, is above {MEMORY_SHARE:.0%} of the device's"
    seconds = cost.seconds(_epochs(method, epochs))
    if m.budget_seconds is not None and seconds > m.budget_seconds:
        return f"about {_duration(seconds)} of training, above the budget of {_duration(m.budget_seconds)}"
    return None


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def domain_gap(pieces: float, ref_pieces: float, unk: float, lm: float | None, ref_lm: float | None) -> list[str]:
    """Why the text looks unlike the model's pre-training text, one phrase per measure over its threshold."""
    out = []
    if ref_pieces > 0 and pieces > PIECES_RATIO * ref_pieces:
        out.append(f"{pieces:.2f} pieces per word against {ref_pieces:.2f} on the reference (over {PIECES_RATIO}x)")
    if unk > UNK_RATE:
        out.append(f"{unk:.1%} unknown tokens (over {UNK_RATE:.0%})")
    if lm is not None and ref_lm is not None and lm - ref_lm > LM_GAP:
        out.append(f"LM loss {lm:.2f} against {ref_lm:.2f} on the reference (over {LM_GAP:g} nats more)")
    return out
