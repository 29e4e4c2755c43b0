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

Undefined correlations (a constant input) are NaN, as in scipy. `PRIMARY` names the metric that picks the best
checkpoint for each task; every metric here is higher-is-better except perplexity.
"""

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tinygraft.data.ner import word_predictions
from tinygraft.data.qa import postprocess_qa
from tinygraft.errors import TinygraftError

PRIMARY = {
    "classify": "accuracy",
    "multi_label": "macro_f1",
    "regression": "spearman",
    "tokens": "entity_f1",
    "qa": "f1",
    "similarity": "spearman",
    "instruct": "perplexity",
    "lm": "perplexity",
}
LOWER_IS_BETTER = {"perplexity", "loss"}


def primary_metric(task: str, problem: str = "single_label") -> tuple[str, bool]:
    """(metric name, higher is better) that picks the best checkpoint and early-stops a run."""
    name = PRIMARY[problem if task == "classify" and problem != "single_label" else task]
    return name, name not in LOWER_IS_BETTER


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


# ------------------------------------------------------------------------------------------ from model outputs
class TaskScorer:
    """Collects a task model's outputs over the validation batches and turns them into that task's metrics.

        scorer = TaskScorer("classify", problem="single_label")
        for batch in eval_batches(features, batch_size, pad_id):
            outputs, loss = model(batch)
            scorer.add(outputs, batch, loss)
        metrics = scorer.result()  # {"loss": ..., "accuracy": ..., "macro_f1": ...}

    tokens: give `label_map` and `sentences` (the TaggedSentence list the features came from, in order);
    qa: give `examples` and `features` (QAExample list and the window features, in order).
    """

    def __init__(
        self, task: str, problem: str = "single_label", label_map=None, sentences=None, examples=None, features=None
    ):
        self.task, self.problem = task, problem
        self.label_map, self.sentences, self.examples, self.features = label_map, sentences, examples, features
        self.preds, self.gold = [], []
        self.loss_sum, self.loss_weight = 0.0, 0

    def add(self, outputs: dict, batch: dict, loss=None) -> None:
        n = int(batch[next(k for k in batch if k.startswith("input_ids"))].shape[0])
        if loss is not None:  # mean over examples, or over target tokens for language modelling
            w = int(outputs["n_targets"]) if "n_targets" in outputs else n
            self.loss_sum, self.loss_weight = self.loss_sum + float(loss) * w, self.loss_weight + w
        if self.task == "classify":
            z = outputs["logits"].detach().float().cpu()
            pred = {"single_label": z.argmax(-1), "multi_label": z > 0, "regression": z.squeeze(-1)}[self.problem]
            self.preds.extend(pred.tolist())
            if "labels" in batch:
                self.gold.extend(batch["labels"].tolist())
        elif self.task == "tokens":
            ids = outputs["logits"].detach().argmax(-1).cpu().tolist()
            self.preds.extend(zip(ids, batch["word_ids"]))
        elif self.task == "qa":
            mask = batch["attention_mask"].cpu()
            for i in range(n):
                T = int(mask[i].sum())
                self.preds.append(
                    (
                        outputs["start_logits"][i, :T].detach().float().cpu().numpy(),
                        outputs["end_logits"][i, :T].detach().float().cpu().numpy(),
                    )
                )
        elif self.task == "similarity":
            self.preds.extend(outputs["scores"].detach().float().cpu().tolist())
            if "labels" in batch:
                self.gold.extend(batch["labels"].tolist())

    def result(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / self.loss_weight} if self.loss_weight else {}
        if self.task == "instruct" and self.loss_weight:
            out["perplexity"] = perplexity(out["loss"])
        elif self.task == "classify" and self.gold:
            if self.problem == "single_label":
                out.update(classification_metrics(self.preds, self.gold))
            elif self.problem == "multi_label":
                out.update(multi_label_metrics(np.array(self.preds), np.array(self.gold)))
            else:
                out.update(similarity_metrics(self.preds, self.gold))
        elif self.task == "similarity" and self.gold:
            out.update(similarity_metrics(self.preds, self.gold))
        elif self.task == "tokens":
            pred_tags = [
                word_predictions(p, w, len(s.words), self.label_map) for (p, w), s in zip(self.preds, self.sentences)
            ]
            out.update(entity_f1(pred_tags, [s.tags for s in self.sentences]))
        elif self.task == "qa":
            answers = postprocess_qa(
                self.examples, self.features, [p[0] for p in self.preds], [p[1] for p in self.preds]
            )
            out.update(squad_metrics(answers, [e.answers for e in self.examples]))
        return out
