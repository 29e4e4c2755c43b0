"""`--task tokens`: a tag per word (named entities, IOB2).

data     CoNLL columns (the word first, the tag last, a blank line between sentences) or JSONL token/tag lists
head     dropout -> Linear(C, L) per token       the first sub-word of each word carries its tag; continuations,
                                                   special tokens and padding are -100 (data/ner.py aligns them)
loss     CE over the tagged tokens
metric   entity-level F1, strict IOB2 (+ precision and recall)
predict  {"words", "tags"}; input: CoNLL columns whose last column holds the run's tags, JSONL token lists, or
         one sentence of whitespace-separated words per line
"""

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from tinygraft.core.config import setting
from tinygraft.core.layers import Dropout
from tinygraft.data import ner
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features, hidden_size
from tinygraft.peft.files import PeftHead
from tinygraft.tasks import metrics
from tinygraft.tasks.base import Scorer, Task, read_lines
from tinygraft.tasks.classify import DROPOUT_HELP, check_dropout


class TokenClassificationHead(nn.Module):
    """A tag per token (NER); the labels are -100 on padding, special tokens and sub-word continuations."""

    pair_inputs = False

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.num_labels = num_labels
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, features: Features, batch: dict):
        logits = self.classifier(self.dropout(features.hidden))  # (B, T, L)
        labels = batch.get("labels")
        if labels is None:
            return {"logits": logits}, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"logits": logits}, loss


@dataclass
class TokensSettings:
    dropout: float = setting(0.1, DROPOUT_HELP)

    def __post_init__(self):
        check_dropout(self.dropout)


class TokensScorer(Scorer):
    collected = ("preds",)

    def __init__(self, label_map, sentences):
        super().__init__()
        self.label_map, self.sentences, self.preds = label_map, sentences, []

    def collect(self, outputs, batch):
        ids = outputs["logits"].detach().argmax(-1).cpu().tolist()
        self.preds.extend(zip(ids, batch["word_ids"]))

    def metrics(self):
        tags = [
            ner.word_predictions(p, w, len(s.words), self.label_map) for (p, w), s in zip(self.preds, self.sentences)
        ]
        return metrics.entity_f1(tags, [s.tags for s in self.sentences])


def looks_like_conll(path: str, tags: set[str]) -> bool:
    """Most word lines have at least two columns and end in one of the run's tags."""
    try:
        lines = [ln.split() for ln in Path(path).read_text(encoding="utf-8").splitlines()[:2000]]
    except (OSError, UnicodeDecodeError):
        return False
    rows = [f for f in lines if f and f[0] != "-DOCSTART-"]
    hits = sum(1 for f in rows if len(f) >= 2 and f[-1] in tags)
    return bool(rows) and hits >= 0.9 * len(rows)


class Tokens(Task):
    name = "tokens"
    summary = "a tag per word (NER: CoNLL columns or JSONL token lists)"
    Settings = TokensSettings
    columns = ("tokens", None, "tags")
    input_formats = ("conll", "jsonl", "text")

    def read(self, path, data, settings, labeled=True):
        text, _, label = self.column_names(data)
        return ner.read_tagged(path, text, label if labeled else None)

    def label_map(self, examples, settings):
        return ner.tag_label_map(examples)

    def encode(self, examples, tokenizer, data, settings, label_map, source):
        return ner.encode_tagged(examples, tokenizer, data.max_length, label_map, source)

    def make_head(self, backbone, settings, label_map, pooling):
        if label_map is None:
            raise TinygraftError("the tokens head needs the tag names (from the training file)")
        return TokenClassificationHead(hidden_size(backbone), len(label_map), settings.dropout)

    def describe_head(self, head):
        return {"num_labels": head.num_labels}

    def peft_head(self, head):  # BertForTokenClassification: dropout, then `classifier` on every token's state
        return PeftHead(
            "TOKEN_CLS", {"classifier.weight": head.classifier.weight, "classifier.bias": head.classifier.bias}
        )

    def loss_count(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def metric(self, settings):
        return "entity_f1", True

    def scorer(self, settings, label_map, examples, features):
        return TokensScorer(label_map, examples)

    def predict_format(self, source, data, label_map):
        if source is None or source == "-":
            return "text"
        if Path(source).suffix == ".jsonl":
            return "jsonl"
        return "conll" if looks_like_conll(source, set(label_map.names) if label_map else set()) else "text"

    def read_predict(self, source, fmt, data, settings):
        if fmt in ("conll", "jsonl"):
            text, _, _ = self.column_names(data)
            if fmt == "jsonl" and Path(source).suffix != ".jsonl":
                raise TinygraftError(f"--input-format jsonl reads a .jsonl file of token lists, not '{source}'")
            if fmt == "conll" and Path(source).suffix == ".jsonl":
                raise TinygraftError(f"'{source}' is JSON Lines; read it with --input-format jsonl")
            return ner.read_tagged(source, text, None)
        return [ner.TaggedSentence(line.split(), None, i + 1) for i, line in enumerate(read_lines(source))]

    def rows(self, examples, features, outs, settings, label_map):
        preds = [(p, w) for o, b in outs for p, w in zip(o["logits"].argmax(-1).tolist(), b["word_ids"])]
        return [
            {"words": s.words, "tags": ner.word_predictions(p, w, len(s.words), label_map)}
            for s, (p, w) in zip(examples, preds)
        ]
