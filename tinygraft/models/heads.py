"""`TaskModel`: a GPT or BERT backbone with a task head on top, the one module the fine-tuning loop trains.

    TaskModel(backbone, head).forward(batch: dict) -> (outputs: dict, loss | None)

The backbone turns token ids into hidden states (`Features`); the head pools or projects them and, when the batch
carries targets, computes the loss. The heads themselves live with their tasks (tinygraft/tasks/: classify.py's
sequence classifier, tokens.py's tagger, qa.py's span head, similarity.py's bi-encoder, instruct.py's reuse of the
GPT's own LM head). What a head declares, the model reads:

    head.pair_inputs   True: the batch holds two texts (keys suffixed _a and _b), encoded one after the other
    head.pooling       the pooling it reads, if any (models/pooling.py); "pooler" needs a BERT with a pooler
    head.family        the backbone family it needs ("gpt" to reuse a causal LM's head), or None for either
    head.reads_tokens  True: it is called as head(backbone, batch) and runs the backbone on sequences of its own
                       (a GPT's zero-shot label likelihoods, train/methods/noshot.py), not on the batch's text alone

Batch keys (from data/labeled.py's collate): `input_ids`, `attention_mask` (1 = real token, right-padded),
`token_type_ids` (BERT), and the targets the head reads; keys a head does not use are ignored.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT
from tinygraft.models.pooling import pool


class Features(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) final hidden states
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    pooled: torch.Tensor | None  # (B, C) BERT's pooler output; None for GPT or a pooler-less BERT
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None  # GPT's tied output layer (prompt completion)

    def pool(self, how: str) -> torch.Tensor:
        return pool(self.hidden, self.attention_mask, how, self.pooled)


def hidden_size(backbone: nn.Module) -> int:
    return unwrap(backbone).config.n_embd


def unwrap(backbone: nn.Module) -> nn.Module:
    """A BERT pre-trained with its MLM head fine-tunes as its encoder: the MLM head is dropped."""
    return backbone.bert if isinstance(backbone, BERTForMaskedLM) else backbone


class TaskModel(nn.Module):
    """backbone + head, with one uniform `forward(batch) -> (outputs, loss)` for every task.

    Parameters live under `backbone.` (the GPT's or BERT's own names) and `head.`; the freezing methods find the
    blocks through `blocks`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone = unwrap(backbone)
        if not isinstance(backbone, (GPT, BERT)):
            raise TypeError(f"backbone must be a GPT or a BERT, got {type(backbone).__name__}")
        self.family = "gpt" if isinstance(backbone, GPT) else "bert"
        if getattr(head, "pooling", None) == "pooler" and (self.family == "gpt" or backbone.pooler is None):
            raise TinygraftError(
                f"pooling 'pooler' needs a BERT with a pooler layer; this {self.family} has none "
                "(use 'cls', 'mean' or 'last')"
            )
        needs = getattr(head, "family", None)
        if needs is not None and needs != self.family:
            raise TinygraftError(
                f"the {type(head).__name__} needs a {needs.upper()} backbone; this one is a {self.family.upper()}"
            )
        self.backbone = backbone
        self.head = head
        self.pooled_cache: PooledCache | None = None  # a linear probe sets one (train/methods/freezing.py)

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
        if getattr(self.head, "reads_tokens", False):
            return self.head(self.backbone, batch)
        if getattr(self.head, "pair_inputs", False):
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

    `rows` is the cache itself, for any per-example features: it keeps what `compute(ids, mask, token_types)` returns
    for each example of a batch. `features` keeps the pooled last layer (the linear-probe method); `tinygraft probe`
    (analysis/probe.py) keeps every layer's pooled vector, or every layer's real tokens, from one pass per example.
    """

    def __init__(self, pooling: str | None = None):
        self.pooling = pooling  # what `features` pools with; `rows` alone needs none
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def features(self, run_backbone, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None):
        vec = torch.stack(self.rows(lambda *a: run_backbone(*a).pool(self.pooling).detach(), ids, mask, token_types))
        one = torch.ones(vec.shape[0], 1, dtype=mask.dtype, device=mask.device)
        return Features(vec[:, None, :], one, vec if self.pooling == "pooler" else None, None)

    def rows(self, compute, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None) -> list:
        """Each example's cached tensor; a batch holding an example not yet seen is computed whole (its rows as
        computed, each stored unless already kept)."""
        keys = self._keys(ids, mask, token_types)
        if all(k in self.store for k in keys):
            self.hits += len(keys)
            return [self.store[k] for k in keys]
        fresh = compute(ids, mask, token_types)  # (B, ...) or a list of B tensors
        self.misses += len(keys)
        for k, v in zip(keys, fresh):
            self.store.setdefault(k, v.clone())  # a clone: the batch's tensor is not kept alive
        return list(fresh)

    @staticmethod
    def _keys(ids, mask, token_types) -> list[bytes]:
        rows = torch.stack([ids, token_types if token_types is not None else torch.zeros_like(ids)], 1).cpu()
        keep = mask.bool().cpu()
        return [rows[i][:, keep[i]].numpy().tobytes() for i in range(rows.shape[0])]
