"""`--task classify`: one label per text (or text pair), several labels, or a score.

    data     a table (TSV / CSV / JSONL / JSON) with a text column (+ `--text-pair-col`) and a label column
    head     pool -> dropout -> Linear(C, L)           `classifier`, transformers' name, so the head exports as-is
    loss     single_label: CE; multi_label: BCE over a multi-hot target; regression: MSE (all in float32)
    metric   accuracy (+ macro-F1); multi_label: macro-F1 (+ subset accuracy); regression: Spearman (+ Pearson)
    predict  {"text", "label", "probabilities": {label: p}}   (multi_label: "labels"; regression: "score")

The demo, when --train is omitted: which stdlib package a docstring comes from (data/demo.py), six classes.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.config import setting
from tinygraft.core.layers import Dropout
from tinygraft.data import labeled as L
from tinygraft.data.demo import write_demo_task
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features, hidden_size
from tinygraft.models.pooling import POOLINGS, check_pooling, default_pooling
from tinygraft.peft.files import PeftHead
from tinygraft.tasks import metrics
from tinygraft.tasks.base import DataSettings, Scorer, Task

PROBLEMS = ("single_label", "multi_label", "regression")
POOLING_HELP = "how the head pools the token states (default: the checkpoint's own, else the model's usual)"
DROPOUT_HELP = "dropout before the head's classifier"


def check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise TinygraftError(f"--dropout must be in [0, 1), got {p}")


class SequenceClassificationHead(nn.Module):
    """One label (CE), several labels (BCE over a multi-hot target) or scores (MSE) per sequence."""

    pair_inputs = False

    def __init__(
        self, hidden: int, num_labels: int, pooling: str = "cls", problem: str = "single_label", dropout: float = 0.1
    ):
        super().__init__()
        check_pooling(pooling)
        if problem not in PROBLEMS:
            raise TinygraftError(f"unknown problem type {problem!r} (known: {', '.join(PROBLEMS)})")
        if num_labels < 1 or (problem == "single_label" and num_labels < 2):
            least = "at least 2" if problem == "single_label" else "at least 1"
            raise TinygraftError(f"a {problem} head needs {least} labels, got {num_labels}")
        self.pooling, self.problem, self.num_labels = pooling, problem, num_labels
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, features: Features, batch: dict):
        logits = self.classifier(self.dropout(features.pool(self.pooling)))  # (B, L)
        labels = batch.get("labels")
        if labels is None:
            return {"logits": logits}, None
        z = logits.float()
        if self.problem == "single_label":
            loss = F.cross_entropy(z, labels.long())
        elif self.problem == "multi_label":
            loss = F.binary_cross_entropy_with_logits(z, labels.float())
        else:
            loss = F.mse_loss(z.squeeze(-1) if self.num_labels == 1 else z, labels.float())
        return {"logits": logits}, loss


@dataclass
class ClassifySettings:
    problem: Literal["single_label", "multi_label", "regression"] = setting(
        "single_label", "one label per text, several (multi_label: comma-separated or a JSON list), or a score"
    )
    pooling: Literal[POOLINGS] | None = setting(None, POOLING_HELP)  # type: ignore[valid-type]
    dropout: float = setting(0.1, DROPOUT_HELP)

    def __post_init__(self):
        check_dropout(self.dropout)


class ClassifyScorer(Scorer):
    collected = ("preds", "gold")

    def __init__(self, problem: str):
        super().__init__()
        self.problem, self.preds, self.gold = problem, [], []

    def collect(self, outputs, batch):
        z = outputs["logits"].detach().float().cpu()
        pred = {"single_label": z.argmax(-1), "multi_label": z > 0, "regression": z.squeeze(-1)}[self.problem]
        self.preds.extend(pred.tolist())
        if "labels" in batch:
            self.gold.extend(batch["labels"].tolist())

    def metrics(self):
        if not self.gold:
            return {}
        if self.problem == "single_label":
            return metrics.classification_metrics(self.preds, self.gold)
        if self.problem == "multi_label":
            return metrics.multi_label_metrics(np.array(self.preds), np.array(self.gold))
        return metrics.similarity_metrics(self.preds, self.gold)


class Classify(Task):
    name = "classify"
    summary = "a label (or labels, or a score) per text or text pair"
    Settings = ClassifySettings
    columns = ("text", None, "label")

    def demo(self, out_dir: Path):
        return write_demo_task(out_dir)

    def read(self, path, data: DataSettings, settings: ClassifySettings, labeled=True):
        text, pair, label = self.column_names(data)
        return L.read_labeled(path, text, label if labeled else None, pair, settings.problem, data.quote_none)

    def label_map(self, examples, settings):
        return None if settings.problem == "regression" else L.LabelMap.build(ex.label for ex in examples)

    def encode(self, examples, tokenizer, data, settings, label_map, source):
        return L.encode_classification(examples, tokenizer, data.max_length, label_map, settings.problem, source)

    def make_head(self, backbone, settings, label_map, pooling):
        if label_map is None and settings.problem != "regression":
            raise TinygraftError("the classify head needs the number of labels (from the training file's label map)")
        num_labels = len(label_map) if label_map is not None else 1
        pooling = settings.pooling or default_pooling(backbone, pooling)
        return SequenceClassificationHead(
            hidden_size(backbone), num_labels, pooling, settings.problem, settings.dropout
        )

    def describe_head(self, head):
        return {"num_labels": head.num_labels, "pooling": head.pooling, "problem": head.problem}

    def peft_head(self, head):
        if head.pooling != "pooler":  # BertForSequenceClassification classifies the pooler's output, nothing else
            return None
        c = head.classifier
        return PeftHead("SEQ_CLS", {"classifier.weight": c.weight, "classifier.bias": c.bias})

    def metric(self, settings):
        return {
            "single_label": ("accuracy", True),
            "multi_label": ("macro_f1", True),
            "regression": ("spearman", True),
        }[settings.problem]

    def scorer(self, settings, label_map, examples, features):
        return ClassifyScorer(settings.problem)

    def pair_input(self, data):
        return data.text_pair_col is not None

    def rows(self, examples, features, outs, settings, label_map):
        names = label_map.names if label_map is not None else []
        z = torch.cat([o["logits"] for o, _ in outs])
        rows = []
        for ex, zi in zip(examples, z):
            row = {"text": ex.text} if ex.text_pair is None else {"text": ex.text, "text_pair": ex.text_pair}
            if settings.problem == "regression":
                row["score"] = float(zi[0])
            elif settings.problem == "multi_label":
                p = zi.sigmoid()
                row["labels"] = [n for n, pi in zip(names, p) if pi > 0.5]
                row["probabilities"] = {n: round(float(pi), 6) for n, pi in zip(names, p)}
            else:
                p = zi.softmax(-1)
                row["label"] = names[int(p.argmax())]
                row["probabilities"] = {n: round(float(pi), 6) for n, pi in zip(names, p)}
            rows.append(row)
        return rows
