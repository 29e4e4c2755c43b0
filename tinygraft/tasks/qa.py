"""`--task qa`: extractive question answering, the answer a span of the context.

data     SQuAD v1.1 JSON (one file given alone is split by article: validation contexts are unseen), or a table
         with question / context / answer columns (`--answer-start-col` the answer's character offset)
head     Linear(C, 2) -> start, end logits        over `[CLS] question [SEP] context window [SEP]`, strided
                                                   windows over long contexts (data/qa.py)
loss     (CE(start) + CE(end)) / 2, as BERT's SQuAD recipe; a window without the answer points both at [CLS]
metric   F1 and exact match, SQuAD normalisation
predict  {"question", "answer"}; input: SQuAD JSON, a table with the run's columns, or question<TAB>context lines
"""

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from tinygraft.core.config import setting
from tinygraft.data import qa
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features, hidden_size
from tinygraft.peft.files import PeftHead
from tinygraft.tasks import metrics
from tinygraft.tasks.base import Scorer, Task, read_lines, split_pair


class QuestionAnsweringHead(nn.Module):
    """Start and end logits over the tokens; post-processing (data/qa.py) keeps only spans inside the context,
    start <= end, at most 30 tokens long."""

    pair_inputs = False
    num_labels = 2

    def __init__(self, hidden: int):
        super().__init__()
        self.qa_outputs = nn.Linear(hidden, 2)  # transformers' name

    def forward(self, features: Features, batch: dict):
        start, end = self.qa_outputs(features.hidden).unbind(dim=-1)  # each (B, T)
        out = {"start_logits": start, "end_logits": end}
        if batch.get("start_positions") is None:
            return out, None
        loss_s = F.cross_entropy(start.float(), batch["start_positions"].long())
        loss_e = F.cross_entropy(end.float(), batch["end_positions"].long())
        return out, (loss_s + loss_e) / 2


@dataclass
class QASettings:
    doc_stride: int | None = setting(None, "overlap of the context windows in tokens (default min(128, max_length/4))")
    answer_start_col: str | None = setting(None, "tables: the column of the answer's character offset in the context")

    def __post_init__(self):
        if self.doc_stride is not None and self.doc_stride < 0:
            raise TinygraftError(f"--doc-stride must be at least 0, got {self.doc_stride}")


def window_logits(outs) -> tuple[list, list]:
    """Each window's start and end logits, cut to its real length."""
    starts, ends = [], []
    for o, b in outs:
        for i in range(o["start_logits"].shape[0]):
            T = int(b["attention_mask"][i].sum())
            starts.append(o["start_logits"][i, :T].float().cpu().numpy())
            ends.append(o["end_logits"][i, :T].float().cpu().numpy())
    return starts, ends


class QAScorer(Scorer):
    collected = ("outs",)

    def __init__(self, examples, features):
        super().__init__()
        self.examples, self.features, self.outs = examples, features, []

    def collect(self, outputs, batch):
        self.outs.append(({k: v.detach() for k, v in outputs.items()}, {"attention_mask": batch["attention_mask"]}))

    def metrics(self):
        starts, ends = window_logits(self.outs)
        answers = qa.postprocess_qa(self.examples, self.features, starts, ends)
        return metrics.squad_metrics(answers, [e.answers for e in self.examples])


class QA(Task):
    name = "qa"
    summary = "extractive question answering (SQuAD JSON or question/context/answer columns)"
    Settings = QASettings
    columns = ("question", "context", "answer")
    input_formats = ("squad", "table", "text")

    def _by_article(self, data) -> bool:
        """One SQuAD file for both sides: split by article."""
        return Path(data.train).suffix == ".json" and (data.val is None or Path(data.val) == Path(data.train))

    def read(self, path, data, settings, labeled=True, split=None):
        if Path(path).suffix == ".json":
            return qa.read_squad(path, split)
        text, pair, label = self.column_names(data)
        return qa.read_qa_table(
            path, text, pair, label if labeled else None, settings.answer_start_col, None, data.quote_none
        )

    def read_training(self, data, settings):
        return self.read(data.train, data, settings, split="train" if self._by_article(data) else None)

    def read_validation(self, data, settings):
        if data.train is not None and self._by_article(data):
            return qa.read_squad(data.train, "val")  # the same file, the other articles
        return super().read_validation(data, settings)

    def encode(self, examples, tokenizer, data, settings, label_map, source):
        stride = settings.doc_stride if settings.doc_stride is not None else min(128, data.max_length // 4)
        return qa.make_qa_features(examples, tokenizer, data.max_length, stride, min(64, data.max_length // 2))

    def make_head(self, backbone, settings, label_map, pooling):
        return QuestionAnsweringHead(hidden_size(backbone))

    def peft_head(self, head):  # BertForQuestionAnswering: the same `qa_outputs` over every token's state
        return PeftHead(
            "QUESTION_ANS", {"qa_outputs.weight": head.qa_outputs.weight, "qa_outputs.bias": head.qa_outputs.bias}
        )

    def metric(self, settings):
        return "f1", True

    def scorer(self, settings, label_map, examples, features):
        return QAScorer(examples, features)

    def predict_format(self, source, data, label_map):
        if source not in (None, "-") and Path(source).suffix == ".json":
            return "squad"
        return super().predict_format(source, data, label_map)

    def pair_input(self, data):
        return True

    def read_predict(self, source, fmt, data, settings):
        if fmt == "squad":
            return qa.read_squad(source)
        if fmt == "table":
            text, pair, _ = self.column_names(data)
            return qa.read_qa_table(source, text, pair, None, None, None, data.quote_none)
        pairs = [split_pair(line, 2, "a question and a context") for line in read_lines(source)]
        return [qa.QAExample(str(i), "", c, q, [], []) for i, (q, c) in enumerate(pairs)]

    def rows(self, examples, features, outs, settings, label_map):
        starts, ends = window_logits(outs)
        answers = qa.postprocess_qa(examples, features, starts, ends)
        return [{"question": ex.question, "answer": ans} for ex, ans in zip(examples, answers)]
