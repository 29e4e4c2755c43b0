"""Every layer's features from one backbone pass: the embeddings' output (layer 0) and each block's (1 .. L).

    layer_states(model, ids, mask, token_types)    [(B, T, C)] * (L + 1), read by the distillation taps
                                                   (train/distill_losses.py: Tap), not by a second set of hooks
    pooled(states, mask, pooling)                  per layer (B, C * modes): the model's own sentence pooling
    real_tokens(states, mask)                      per layer (real tokens of the batch, C), example after example
    layer_features(model, tokenizer, texts, ...)   batch by batch, one of the two above as CPU tensors

The texts are tokenised with the model's template and padded on the right, as `tinygraft embed` does
(models/pooling.py: sentence_embeddings): eval mode, no gradients, and the pads masked out of every pooling (a GPT
needs no mask: under causal attention a real token never sees the pads after it).

Layer L is the last block's output: for a GPT that is before its final LayerNorm, the residual stream itself.
The checkpoint's Normalize step (all-MiniLM-L6-v2 L2-normalises its embeddings) is not applied: it serves the
cosine similarity of finished embeddings, while CKA and probes read what each layer holds.
"""

import sys
from collections.abc import Iterator

import torch
from torch import nn
from tqdm import tqdm

from tinygraft.data.labeled import collate
from tinygraft.errors import TinygraftError
from tinygraft.models.pooling import Pooling, pool, token_states
from tinygraft.train.distill_losses import Tap, n_layers


def positions_of(model: nn.Module) -> int:
    return getattr(model.config, "max_position_embeddings", None) or model.config.block_size


def default_max_len(model: nn.Module, pooling: Pooling) -> int:
    """The longest input the model embeds with: its checkpoint's max_seq_length (256 for MiniLM), else its positions."""
    return min(pooling.max_seq_length or positions_of(model), positions_of(model))


@torch.no_grad()
def layer_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None):
    """[(B, T, C)] * (L + 1): the embeddings' output, then each block's, from one forward of `model` (GPT or BERT)."""
    T = ids.shape[1]
    with Tap(model, range(n_layers(model) + 1)) as tap:
        token_states(model, ids, mask, token_types if token_types is not None else torch.zeros_like(ids))
    # a prompt-tuning adapter's virtual tokens come first in every layer; the outputs a user sees drop them too
    return [tap.hidden[i][:, -T:] for i in range(len(tap.hidden))]


def pooled(states: list[torch.Tensor], mask: torch.Tensor, pooling: Pooling) -> list[torch.Tensor]:
    """Each layer pooled as the checkpoint pools its last one (several modes concatenated, as sentence-transformers)."""
    return [torch.cat([pool(h.float(), mask, m) for m in pooling.modes], dim=-1) for h in states]


def real_tokens(states: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    keep = mask.bool()
    return [h[keep] for h in states]  # (tokens, C): example 0's real tokens, then example 1's, ...


def encode_texts(tokenizer, texts: list[str], max_len: int) -> list[dict]:
    """The model's inputs for each text (the features `collate` pads into a batch)."""
    features = []
    for text in texts:
        ids, types = tokenizer.encode_for_model(text, max_length=max_len)
        features.append({"input_ids": ids, "token_type_ids": types})
    return features


def layer_features(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    pooling: Pooling | None = None,
    tokens: bool = False,
    batch_size: int = 32,
    max_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[list[torch.Tensor]]:
    """For each batch of `texts`, in order: [(rows, C)] * (L + 1) as `dtype` CPU tensors, a row per text (pooled by
    `pooling`, mean when None) or, with `tokens`, a row per real token (special tokens included)."""
    pooling = pooling or Pooling()
    max_len = max_len or default_max_len(model, pooling)
    if max_len > positions_of(model):
        raise TinygraftError(f"--max-len {max_len} is more than the model's {positions_of(model)} positions")
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = collate(encode_texts(tokenizer, texts[start : start + batch_size], max_len), pad)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            states = layer_states(model, ids, mask, batch["token_type_ids"].to(device))
            rows = real_tokens(states, mask) if tokens else pooled(states, mask, pooling)
            yield [r.to("cpu", dtype) for r in rows]
    finally:
        model.train(was_training)


def progress(total: int, unit: str, what: str) -> tqdm:
    """A bar on a terminal, as training shows one (train/progress.py); nothing in a log or a test."""
    return tqdm(total=total, unit=unit, desc=what, dynamic_ncols=True, leave=False, disable=not sys.stderr.isatty())
