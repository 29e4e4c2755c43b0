"""Task heads over a GPT or BERT backbone, and `TaskModel`, the one module the fine-tuning loop trains.

    TaskModel(backbone, head).forward(batch: dict) -> (outputs: dict, loss | None)

The backbone turns token ids into hidden states (`Features`); the head pools or projects them and, when the batch
carries targets, computes the loss. Every head, with its loss (all computed in float32):

    SequenceClassificationHead   pool -> dropout -> Linear(C, L)      CE | multi-label BCE | MSE (regression)
    TokenClassificationHead      dropout -> Linear(C, L) per token    CE over tokens, -100 ignored (padding and
                                                                      sub-word continuations)
    QuestionAnsweringHead        Linear(C, 2) -> start, end logits    (CE(start) + CE(end)) / 2, as BERT/SQuAD
    SimilarityHead (bi-encoder)  pool(a), pool(b) -> cosine           "cosine": MSE(cos, score / max_score)
                                                                      (sentence-transformers' CosineSimilarityLoss);
                                                                      "contrastive": CE(scale * cos(a_i, b_j), i)
                                                                      (MultipleNegativesRankingLoss, in-batch)
    PromptCompletionHead (GPT)   the GPT's own tied lm_head           CE of logits[:, :-1] vs labels[:, 1:], with
                                                                      the prompt and padding at -100

Poolings (B, T, C) -> (B, C): `cls` (first token), `mean` (over real tokens only, as sentence-transformers),
`max` (over real tokens), `pooler` (BERT's tanh dense over [CLS]; `transformers`' default head), `last` (the last
real token: the one a causal GPT has read the whole sequence at). A checkpoint that ships a sentence-transformers
pooling config (all-MiniLM-L6-v2: mean) should be fine-tuned with that pooling: its pooler was never trained
(issue 9: a pooler head on MiniLM probes to 0.509 on SST-2, mean pooling to 0.792). `default_pooling` decides.

Batch keys (from core/labeled.py's collate): `input_ids`, `attention_mask` (1 = real token, right-padded),
`token_type_ids` (BERT), and the targets: `labels` (class ids / multi-hot / scores / per-token ids),
`start_positions` + `end_positions` (QA). The bi-encoder reads the same keys with suffixes `_a` and `_b`.
Keys a head does not use (QA offsets, example indices) are ignored.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT

POOLINGS = ("cls", "mean", "max", "pooler", "last")
PROBLEMS = ("single_label", "multi_label", "regression")
TASKS = ("classify", "tokens", "qa", "similarity", "instruct")


class Features(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) final hidden states
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    pooled: torch.Tensor | None  # (B, C) BERT's pooler output; None for GPT or a pooler-less BERT
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None  # GPT's tied output layer (prompt completion)


# ------------------------------------------------------------------------------------------------------ pooling
def pool(features: Features, how: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C) by `how` (see the module docstring)."""
    h, mask = features.hidden, features.attention_mask
    if how == "cls":
        return h[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if how == "max":
        return h.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(h.dtype).min).max(dim=1).values
    if how == "pooler":
        if features.pooled is None:
            raise TinygraftError("pooling 'pooler' needs a BERT with a pooler layer; use 'cls' or 'mean'")
        return features.pooled
    if how == "last":
        T = mask.shape[1]
        # index of the last real token; works for any padding side (argmax returns the first maximum)
        last = (mask.bool() * torch.arange(1, T + 1, device=mask.device)).argmax(dim=1)  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise TinygraftError(f"unknown pooling {how!r} (known: {', '.join(POOLINGS)})")


def pooling_from_sentence_transformers(config: dict) -> str:
    """The pooling a sentence-transformers `1_Pooling/config.json` names, as one of ours."""
    if isinstance(config.get("pooling_mode"), str):  # newer configs may carry the mode by name
        named = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}
        if config["pooling_mode"] not in named:
            raise TinygraftError(f"sentence-transformers pooling {config['pooling_mode']!r} is not supported")
        return named[config["pooling_mode"]]
    flags = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_max_tokens": "max",
        "pooling_mode_lasttoken": "last",
        "pooling_mode_mean_sqrt_len_tokens": None,
        "pooling_mode_weightedmean_tokens": None,
    }
    on = [k for k in flags if config.get(k)]
    if len(on) != 1 or flags[on[0]] is None:
        raise TinygraftError(
            f"sentence-transformers pooling config turns on {on or 'no mode'}; tinygraft supports exactly one of "
            "cls, mean, max, lasttoken"
        )
    return flags[on[0]]


def default_pooling(backbone: nn.Module, st_pooling_config: dict | None = None) -> str:
    """The pooling a sequence or similarity head uses unless the user names one.

    The checkpoint's sentence-transformers pooling when it ships one; else `last` for a GPT (a causal model has
    read the whole text only at its last token), `pooler` for a BERT with a pooler (`transformers`' default),
    `cls` for a pooler-less BERT (one we pre-trained with the MLM head).
    """
    if st_pooling_config is not None:
        return pooling_from_sentence_transformers(st_pooling_config)
    backbone = _unwrap(backbone)
    if isinstance(backbone, GPT):
        return "last"
    return "pooler" if backbone.pooler is not None else "cls"


# -------------------------------------------------------------------------------------------------------- heads
class SequenceClassificationHead(nn.Module):
    """One label (CE), several labels (BCE over a multi-hot target) or scores (MSE) per sequence."""

    task = "classify"
    pair_inputs = False

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        pooling: str = "cls",
        problem: str = "single_label",
        dropout: float = 0.1,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise TinygraftError(f"unknown pooling {pooling!r} (known: {', '.join(POOLINGS)})")
        if problem not in PROBLEMS:
            raise TinygraftError(f"unknown problem type {problem!r} (known: {', '.join(PROBLEMS)})")
        if num_labels < 1 or (problem == "single_label" and num_labels < 2):
            raise TinygraftError(
                f"a {problem} head needs {'at least 2' if problem == 'single_label' else 'at least 1'}"
                f" labels, got {num_labels}"
            )
        self.pooling, self.problem, self.num_labels = pooling, problem, num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)  # transformers' name, so the head exports as-is

    def forward(self, features: Features, batch: dict):
        logits = self.classifier(self.dropout(pool(features, self.pooling)))  # (B, L)
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

    def describe(self) -> dict:
        return {"task": self.task, "num_labels": self.num_labels, "pooling": self.pooling, "problem": self.problem}


class TokenClassificationHead(nn.Module):
    """A tag per token (NER); the labels are -100 on padding, special tokens and sub-word continuations."""

    task = "tokens"
    pair_inputs = False

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, features: Features, batch: dict):
        logits = self.classifier(self.dropout(features.hidden))  # (B, T, L)
        labels = batch.get("labels")
        if labels is None:
            return {"logits": logits}, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"logits": logits}, loss

    def describe(self) -> dict:
        return {"task": self.task, "num_labels": self.num_labels}


class QuestionAnsweringHead(nn.Module):
    """Start and end logits over the tokens of a [CLS] question [SEP] context-window [SEP] input.

    A window without the answer is trained to point both ends at position 0 ([CLS]), as in BERT's SQuAD recipe.
    Post-processing (core/qa_data.py) keeps only spans inside the context, start <= end, at most N tokens long.
    """

    task = "qa"
    pair_inputs = False
    num_labels = 2

    def __init__(self, hidden_size: int):
        super().__init__()
        self.qa_outputs = nn.Linear(hidden_size, 2)  # transformers' name

    def forward(self, features: Features, batch: dict):
        start, end = self.qa_outputs(features.hidden).unbind(dim=-1)  # each (B, T)
        out = {"start_logits": start, "end_logits": end}
        if batch.get("start_positions") is None:
            return out, None
        loss_s = F.cross_entropy(start.float(), batch["start_positions"].long())
        loss_e = F.cross_entropy(end.float(), batch["end_positions"].long())
        return out, (loss_s + loss_e) / 2

    def describe(self) -> dict:
        return {"task": self.task}


class SimilarityHead(nn.Module):
    """Bi-encoder: both sentences go through the same backbone and pooling; the score is their cosine.

    `loss="cosine"`: MSE between cos(a, b) and label / max_score (STS-B scores 0-5 -> 0-1), as
    sentence-transformers' CosineSimilarityLoss. `loss="contrastive"`: each (a_i, b_i) is a positive pair and every
    other b_j in the batch a negative; CE over scale * cos(a_i, b_j) with target i (MultipleNegativesRankingLoss,
    scale 20 as there). No parameters: fine-tuning moves the backbone, and a linear probe has nothing to train.
    """

    task = "similarity"
    pair_inputs = True
    num_labels = 1

    def __init__(self, pooling: str = "mean", loss: str = "cosine", max_score: float = 5.0, scale: float = 20.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise TinygraftError(f"unknown pooling {pooling!r} (known: {', '.join(POOLINGS)})")
        if loss not in ("cosine", "contrastive"):
            raise TinygraftError(f"unknown similarity loss {loss!r} (known: cosine, contrastive)")
        self.pooling, self.loss, self.max_score, self.scale = pooling, loss, max_score, scale

    def forward(self, features: tuple[Features, Features], batch: dict):
        a = F.normalize(pool(features[0], self.pooling).float(), dim=-1)  # (B, C)
        b = F.normalize(pool(features[1], self.pooling).float(), dim=-1)
        scores = (a * b).sum(-1)  # (B,) cosine
        out = {"scores": scores, "embeddings_a": a, "embeddings_b": b}
        if self.loss == "contrastive":  # needs no labels: the pairs themselves are the positives
            sim = self.scale * a @ b.T  # (B, B): row i scores a_i against every b_j
            return out, F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))
        labels = batch.get("labels")
        if labels is None:
            return out, None
        return out, F.mse_loss(scores, labels.float() / self.max_score)

    def describe(self) -> dict:
        return {
            "task": self.task,
            "pooling": self.pooling,
            "loss": self.loss,
            "max_score": self.max_score,
            "scale": self.scale,
        }


class PromptCompletionHead(nn.Module):
    """Instruction tuning on a GPT: next-token CE on the completion only.

    `labels` is `input_ids` with every prompt and padding position set to -100 (core/labeled.py builds it); the
    shift happens here, as in `transformers`: logits at t predict labels at t + 1.
    """

    task = "instruct"
    pair_inputs = False
    num_labels = 0

    def forward(self, features: Features, batch: dict):
        if features.lm_head is None:
            raise TinygraftError("prompt-completion training needs a GPT backbone (it reuses its language-model head)")
        logits = features.lm_head(features.hidden)  # (B, T, V)
        labels = batch.get("labels")
        if labels is None:
            return {"logits": logits}, None
        target = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100)
        return {"logits": logits, "n_targets": (target != -100).sum()}, loss

    def describe(self) -> dict:
        return {"task": self.task}


# ---------------------------------------------------------------------------------------------------- the model
def _unwrap(backbone: nn.Module) -> nn.Module:
    # A BERT pre-trained with its MLM head: fine-tuning uses the encoder and drops the MLM head.
    return backbone.bert if isinstance(backbone, BERTForMaskedLM) else backbone


class TaskModel(nn.Module):
    """backbone + head, with one uniform `forward(batch) -> (outputs, loss)` for every task.

    Parameters live under `backbone.` (the GPT's or BERT's own names) and `head.`; the methods (linear probe,
    top-k, ...) find the blocks through `blocks`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone = _unwrap(backbone)
        if not isinstance(backbone, (GPT, BERT)):
            raise TypeError(f"backbone must be a GPT or a BERT, got {type(backbone).__name__}")
        self.family = "gpt" if isinstance(backbone, GPT) else "bert"
        pooling = getattr(head, "pooling", None)
        if pooling == "pooler" and (self.family == "gpt" or backbone.pooler is None):
            raise TinygraftError(
                f"pooling 'pooler' needs a BERT with a pooler layer; this {self.family} has none "
                "(use 'cls', 'mean' or 'last')"
            )
        if isinstance(head, PromptCompletionHead) and self.family != "gpt":
            raise TinygraftError("the instruct task trains a GPT (a causal language model); this checkpoint is a BERT")
        self.backbone = backbone
        self.head = head
        self.pooled_cache: PooledCache | None = None  # a linear probe sets one (train/finetune_methods.py)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, bottom first (GPT `transformer.h`, BERT `encoder.layer`)."""
        return self.backbone.transformer.h if self.family == "gpt" else self.backbone.encoder.layer

    def encode(self, batch: dict, suffix: str = "") -> Features:
        ids = batch["input_ids" + suffix]
        mask = batch.get("attention_mask" + suffix)
        if mask is None:
            mask = torch.ones_like(ids)
        token_types = batch.get("token_type_ids" + suffix)
        if self.pooled_cache is not None and not self.backbone.training:
            return self.pooled_cache.features(self.run_backbone, ids, mask, token_types)
        return self.run_backbone(ids, mask, token_types)

    def run_backbone(self, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None) -> Features:
        if self.family == "gpt":
            # Causal attention with right padding: real tokens never see the pads after them, so no mask is needed.
            return Features(self.backbone.hidden_states(ids), mask, None, self.backbone.lm_head)
        out = self.backbone(ids, mask, token_types)
        pooled = out.pooled if self.backbone.pooler is not None else None
        return Features(out.last_hidden_state, mask, pooled, None)

    def forward(self, batch: dict):
        if self.head.pair_inputs:
            return self.head((self.encode(batch, "_a"), self.encode(batch, "_b")), batch)
        return self.head(self.encode(batch), batch)


class PooledCache:
    """Each example's pooled features from a frozen backbone in eval mode, keyed by its real tokens.

    A linear probe's backbone never changes and runs without dropout, so an example pools to the same vector every
    epoch: computing it once leaves later epochs (and every later evaluation) with the head's own work. One C-vector
    per example is kept, so only pooling heads (classify, similarity) use it; token and span heads read every
    position. A batch with an example not yet seen runs the backbone whole, exactly as without the cache; a cached
    vector computed beside other pads differs from a fresh one only by float rounding (~1e-7).

    The cached Features hold the pooled vector as a one-token sequence: every pooling of it returns the vector.
    """

    def __init__(self, pooling: str):
        self.pooling = pooling
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def features(self, run_backbone, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None):
        keys = self._keys(ids, mask, token_types)
        if all(k in self.store for k in keys):
            vec = torch.stack([self.store[k] for k in keys])
            self.hits += len(keys)
        else:
            vec = pool(run_backbone(ids, mask, token_types), self.pooling).detach()
            self.misses += len(keys)
            for k, v in zip(keys, vec):
                self.store.setdefault(k, v.clone())  # a clone: the batch's (B, C) tensor is not kept alive
        one = torch.ones(vec.shape[0], 1, dtype=mask.dtype, device=mask.device)
        return Features(vec[:, None, :], one, vec if self.pooling == "pooler" else None, None)

    @staticmethod
    def _keys(ids, mask, token_types) -> list[bytes]:
        rows = torch.stack([ids, token_types if token_types is not None else torch.zeros_like(ids)], 1).cpu()
        keep = mask.bool().cpu()
        return [rows[i][:, keep[i]].numpy().tobytes() for i in range(rows.shape[0])]


def hidden_size(backbone: nn.Module) -> int:
    return _unwrap(backbone).config.n_embd


def make_head(
    task: str,
    backbone: nn.Module,
    *,
    num_labels: int | None = None,
    pooling: str | None = None,
    problem: str = "single_label",
    loss: str = "cosine",
    max_score: float = 5.0,
    scale: float = 20.0,
    dropout: float = 0.1,
    st_pooling_config: dict | None = None,
) -> nn.Module:
    """The head for a CLI task name; `pooling=None` takes `default_pooling(backbone, st_pooling_config)`.

    `make_head(**head.describe(), backbone=...)` rebuilds a saved head (describe() is stored in config.json).
    """
    if task not in TASKS:
        raise TinygraftError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    C = hidden_size(backbone)
    if pooling is None and task in ("classify", "similarity"):
        pooling = default_pooling(backbone, st_pooling_config)
        if task == "similarity" and pooling == "pooler":
            pooling = "mean"  # a classifier's layer, never trained for similarity; sentence-transformers' default
    if task in ("classify", "tokens") and num_labels is None:
        raise TinygraftError(f"the {task} head needs the number of labels (from the training file's label map)")
    if task == "classify":
        return SequenceClassificationHead(C, num_labels, pooling, problem, dropout)
    if task == "tokens":
        return TokenClassificationHead(C, num_labels, dropout)
    if task == "qa":
        return QuestionAnsweringHead(C)
    if task == "similarity":
        return SimilarityHead(pooling, loss, max_score, scale)
    return PromptCompletionHead()
