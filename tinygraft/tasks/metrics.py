"""Validation metrics of every fine-tuning task, in plain numpy / Python (no scikit-learn, scipy or seqeval).

    accuracy        mean(pred == gold)
    macro_f1        unweighted mean over classes of F1_c = 2 P_c R_c / (P_c + R_c) (0 where undefined); the classes
                    are those present in gold or pred, as scikit-learn's f1_score(average="macro")
    entity_f1       micro P/R/F1 over whole entities, strict IOB2 as seqeval's mode="strict": an entity is a B-X
                    followed by I-X tokens of the same type; a prediction counts only with the exact type and span;
                    an I-X that does not continue a B-X/I-X of type X starts no entity
    exact_match/f1  SQuAD v1.1's official evaluation: answers normalised (lower case, punctuation removed, articles
                    a/an/the removed, whitespace collapsed), max over the gold answers, averaged over questions;
                    reported as fractions in [0, 1] like every other metric here (the official script prints x100)
    pearson         covariance / (std_x std_y)
    spearman        Pearson of the ranks, ties given their average rank (scipy.stats.spearmanr)
    perplexity      exp(mean token cross-entropy)

Undefined correlations (a constant input) are NaN, as in scipy. Every metric here is higher-is-better except
perplexity; each task (tinygraft/tasks/) names the one that picks its best checkpoint.
"""

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tinygraft.errors import TinygraftError


def _same_length(a, b, what: str):
    if len(a) != len(b):
        raise TinygraftError(f"{what}: {len(a)} predictions for {len(b)} gold values")


# ------------------------------------------------------------------------------------------------ classification
def accuracy(pred: Sequence, gold: Sequence) -> float:
    _same_length(pred, gold, "accuracy")
    if len(gold) == 0:
        return float("nan")
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def macro_f1(pred: Sequence, gold: Sequence) -> float:
    _same_length(pred, gold, "macro_f1")
    pred, gold = np.asarray(pred), np.asarray(gold)
    scores = []
    for c in np.union1d(pred, gold):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))  # = 2PR / (P + R)
    return float(np.mean(scores)) if scores else float("nan")


def classification_metrics(pred: Sequence, gold: Sequence) -> dict[str, float]:
    return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold)}


def multi_label_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """(N, L) 0/1 matrices: accuracy = all labels of an example right (subset accuracy), macro_f1 = the mean
    over labels of each label's binary F1 (scikit-learn's multilabel accuracy_score and f1_score 'macro')."""
    pred, gold = np.asarray(pred).astype(bool), np.asarray(gold).astype(bool)
    tp, fp, fn = (pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return {"accuracy": float((pred == gold).all(1).mean()), "macro_f1": float(f1.mean())}


# ------------------------------------------------------------------------------------------------------ entities
def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Strict IOB2 entities of one sentence as (type, first token, last token)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes an entity running to the end
        if tag == "O":
            prefix, t = "O", None
        elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
            prefix, t = tag[0], tag[2:]
        else:
            raise TinygraftError(f"tag {tag!r} is not IOB2 (use O, B-TYPE or I-TYPE)")
        if start is not None and not (prefix == "I" and t == kind):
            spans.add((kind, start, i - 1))
            start = kind = None
        if prefix == "B":
            start, kind = i, t
    return spans


def entity_f1(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over entities of all sentences (seqeval's classification_report 'micro')."""
    _same_length(pred, gold, "entity_f1")
    n_pred = n_gold = n_hit = 0
    for i, (p, g) in enumerate(zip(pred, gold)):
        if len(p) != len(g):
            raise TinygraftError(f"entity_f1: sentence {i} has {len(p)} predicted tags for {len(g)} gold tags")
        ps, gs = entity_spans(p), entity_spans(g)
        n_pred, n_gold, n_hit = n_pred + len(ps), n_gold + len(gs), n_hit + len(ps & gs)
    precision = n_hit / n_pred if n_pred else 0.0
    recall = n_hit / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if n_hit else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


# ------------------------------------------------------------------------------------------------------- SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 evaluate-v1.1.py: lower, remove punctuation, remove articles, collapse whitespace (that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def answer_exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def squad_metrics(pred: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over questions of the best EM and F1 against any of the question's gold answers."""
    _same_length(pred, golds, "squad_metrics")
    if not golds:
        return {"exact_match": float("nan"), "f1": float("nan")}
    em = [max(answer_exact_match(p, g) for g in gs) for p, gs in zip(pred, golds)]
    f1 = [max(answer_f1(p, g) for g in gs) for p, gs in zip(pred, golds)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


# ------------------------------------------------------------------------------------------------- correlations
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y, "pearson")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else float("nan")


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sx = x[order]
    # start index of each run of equal values, and its length
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
    lengths = np.diff(np.r_[starts, len(x)])
    run_rank = starts + (lengths + 1) / 2.0  # mean of ranks starts+1 .. starts+lengths
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_rank, lengths)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y, "spearman")
    return pearson(average_ranks(x), average_ranks(y))


def similarity_metrics(pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    return {"spearman": spearman(pred, gold), "pearson": pearson(pred, gold)}


# ------------------------------------------------------------------------------------------------------ language
def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token cross-entropy (nats); inf rather than an overflow error."""
    return math.exp(mean_loss) if mean_loss < 709 else float("inf")
