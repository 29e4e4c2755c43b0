"""`--task similarity`: how alike two sentences are, as a bi-encoder (STS-B).

data     a table with two sentence columns and a score (STS-B: 0..5; read it with --quote-none)
head     both sentences through the same backbone and pooling; the score is their cosine (no parameters: a
         linear probe has nothing to train here)
loss     cosine: MSE(cos(a, b), score / max_score), sentence-transformers' CosineSimilarityLoss; contrastive:
         CE(scale * cos(a_i, b_j), i) over the batch, each b_j (j != i) a negative (MultipleNegativesRankingLoss)
metric   Spearman (+ Pearson) of the cosines against the scores
predict  {"text", "text_pair", "score"}; input: a table with the run's columns, or sentence<TAB>sentence lines
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.config import setting
from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features
from tinygraft.models.pooling import POOLINGS, check_pooling, default_pooling
from tinygraft.tasks import metrics
from tinygraft.tasks.base import Scorer, Task
from tinygraft.tasks.classify import POOLING_HELP

LOSSES = ("cosine", "contrastive")


class SimilarityHead(nn.Module):
    """Bi-encoder: the cosine of the two pooled sentences (scale 20 for the contrastive loss, as
    sentence-transformers)."""

    pair_inputs = True
    num_labels = 1

    def __init__(self, pooling: str = "mean", loss: str = "cosine", max_score: float = 5.0, scale: float = 20.0):
        super().__init__()
        check_pooling(pooling)
        if loss not in LOSSES:
            raise TinygraftError(f"unknown similarity loss {loss!r} (known: {', '.join(LOSSES)})")
        self.pooling, self.loss, self.max_score, self.scale = pooling, loss, max_score, scale

    def forward(self, features: tuple[Features, Features], batch: dict):
        a = F.normalize(features[0].pool(self.pooling).float(), dim=-1)  # (B, C)
        b = F.normalize(features[1].pool(self.pooling).float(), dim=-1)
        scores = (a * b).sum(-1)  # (B,) cosine
        out = {"scores": scores, "embeddings_a": a, "embeddings_b": b}
        if self.loss == "contrastive":  # needs no labels: the pairs themselves are the positives
            sim = self.scale * a @ b.T  # (B, B): row i scores a_i against every b_j
            return out, F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))
        labels = batch.get("labels")
        if labels is None:
            return out, None
        return out, F.mse_loss(scores, labels.float() / self.max_score)


@dataclass
class SimilaritySettings:
    pooling: Literal[POOLINGS] | None = setting(None, POOLING_HELP)  # type: ignore[valid-type]
    similarity_loss: Literal["cosine", "contrastive"] = setting("cosine", "cosine (regress the score) or contrastive")
    max_score: float = setting(5.0, "the label scale (STS-B 0..5): cosine targets are score / max_score")

    def __post_init__(self):
        if not (math.isfinite(self.max_score) and self.max_score > 0):
            raise TinygraftError(f"--max-score must be a positive number (the top of the scores), got {self.max_score}")


class SimilarityScorer(Scorer):
    collected = ("preds", "gold")

    def __init__(self):
        super().__init__()
        self.preds, self.gold = [], []

    def collect(self, outputs, batch):
        self.preds.extend(outputs["scores"].detach().float().cpu().tolist())
        if "labels" in batch:
            self.gold.extend(batch["labels"].tolist())

    def metrics(self):
        return metrics.similarity_metrics(self.preds, self.gold) if self.gold else {}


class Similarity(Task):
    name = "similarity"
    summary = "sentence-pair similarity as a bi-encoder (STS-B)"
    Settings = SimilaritySettings
    columns = ("sentence1", "sentence2", "score")

    def read(self, path, data, settings, labeled=True):
        text, pair, label = self.column_names(data)
        return L.read_labeled(path, text, label if labeled else None, pair, "regression", data.quote_none)

    def encode(self, examples, tokenizer, data, settings, label_map, source):
        return L.encode_pairs(examples, tokenizer, data.max_length)

    def make_head(self, backbone, settings, label_map, pooling):
        chosen = settings.pooling or default_pooling(backbone, pooling)
        if settings.pooling is None and chosen == "pooler":
            chosen = "mean"  # a classifier's layer, never trained for similarity; sentence-transformers' default
        return SimilarityHead(chosen, settings.similarity_loss, settings.max_score)

    def describe_head(self, head):
        return {"pooling": head.pooling, "loss": head.loss, "max_score": head.max_score, "scale": head.scale}

    def metric(self, settings):
        return "spearman", True

    def scorer(self, settings, label_map, examples, features):
        return SimilarityScorer()

    def pair_input(self, data):
        return True

    def rows(self, examples, features, outs, settings, label_map):
        scores = torch.cat([o["scores"] for o, _ in outs])
        return [{"text": ex.text, "text_pair": ex.text_pair, "score": float(s)} for ex, s in zip(examples, scores)]
