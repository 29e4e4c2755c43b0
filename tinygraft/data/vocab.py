"""Vocabulary extension: add domain tokens to a tokenizer and grow the model's embedding to match.

Each new token's embedding row starts as the mean of the rows of the pieces the old tokenizer split it into
("average of subword embeddings" initialisation, e.g. Hewitt 2021, "Initializing new word embeddings for pretrained
language models"), so the model reads the new id roughly as it read the pieces. Old rows are untouched; a head tied
to the embedding (GPT's lm_head, BERT's MLM decoder) stays tied and grows with it, and a per-token output bias
beside it (BERT's `cls.predictions.bias`) gets the pieces' mean as well. The new tokens become added tokens of
the tokenizer, so each encodes as one id (matched after normalisation: an uncased tokenizer also matches "Covid19"
for "covid19").

This module knows nothing of tinygraft.models: it finds the word embedding by `get_input_embeddings()` or by name
(`wte`, `word_embeddings`, `embed_tokens`), or takes it explicitly.
"""

import torch
from torch import nn

from tinygraft.errors import TinygraftError

EMBEDDING_NAMES = ("wte", "word_embeddings", "embed_tokens")


def find_input_embedding(model: nn.Module) -> nn.Embedding:
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    found = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in EMBEDDING_NAMES
    ]
    if len(found) != 1:
        raise TinygraftError(
            f"found {len(found)} word embeddings in the {type(model).__name__} (looked for modules "
            f"named {', '.join(EMBEDDING_NAMES)}); pass embedding= explicitly"
        )
    return found[0]


def _add_tokens(tokenizer, tokens: list[str]) -> None:
    if hasattr(tokenizer, "add_tokens"):  # TextTokenizer or a bare tokenizers.Tokenizer
        tokenizer.add_tokens(tokens)
    else:
        raise TinygraftError(f"cannot add tokens to a {type(tokenizer).__name__}")


def _vocab_size(tokenizer) -> int:
    size = getattr(tokenizer, "vocab_size", None)  # TextTokenizer; a tokenizers.Tokenizer has get_vocab_size
    return size if isinstance(size, int) else tokenizer.get_vocab_size(with_added_tokens=True)


def _encode(tokenizer, text: str) -> list[int]:
    out = tokenizer.encode(text) if hasattr(tokenizer, "kind") else tokenizer.encode(text, add_special_tokens=False)
    return list(out) if isinstance(out, list) else list(out.ids)


def _grow(t: torch.Tensor, new_rows: int, init: dict[int, list[int]]) -> torch.Tensor:
    """t (V, ...) -> (V + new_rows, ...): old rows copied, row i = mean of t[pieces] for each i in init."""
    out = torch.empty((t.shape[0] + new_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    for row, pieces in init.items():
        out[row] = t[pieces].float().mean(0).to(t.dtype)
    return out


@torch.no_grad()
def extend_vocab(
    model: nn.Module, tokenizer, new_tokens: list[str], embedding: nn.Embedding | None = None
) -> dict[str, int]:
    """Add `new_tokens` to `tokenizer` (in place) and grow `model` to match; returns {token: new id}.

    Tokens the tokenizer already holds as one vocabulary entry are left alone (not in the result). Call it before
    building the optimizer: the embedding (and tied head) become new Parameters.
    """
    if isinstance(new_tokens, str):
        raise TinygraftError("new_tokens must be a list of strings, not one string")
    emb = embedding if embedding is not None else find_input_embedding(model)
    old_rows, old_size = emb.num_embeddings, _vocab_size(tokenizer)
    if old_size > old_rows:
        raise TinygraftError(
            f"the tokenizer has {old_size} tokens but the embedding only {old_rows} rows; they do not belong together"
        )
    pieces: dict[str, list[int]] = {}
    for tok in dict.fromkeys(new_tokens):  # ordered, without repeats
        if not isinstance(tok, str) or not tok.strip():
            raise TinygraftError(f"new token {tok!r} is empty; give non-blank strings")
        if tokenizer.token_to_id(tok) is not None:
            continue
        ids = _encode(tokenizer, tok)
        if not ids:
            raise TinygraftError(f"the tokenizer turns new token {tok!r} into no pieces, so it has no initial row")
        pieces[tok] = ids
    if not pieces:
        return {}
    _add_tokens(tokenizer, list(pieces))
    added = {tok: tokenizer.token_to_id(tok) for tok in pieces}
    for tok, i in added.items():
        if i is None or _encode(tokenizer, tok) != [i]:
            raise TinygraftError(
                f"new token {tok!r} does not encode as one id after adding it (the tokenizer "
                "normalises it into something else); choose the normalised spelling"
            )
    new_rows = max(0, max(added.values()) + 1 - old_rows)
    init = {i: pieces[tok] for tok, i in added.items()}  # ids below old_rows reuse padding rows no token used

    old = emb.weight
    emb.weight = nn.Parameter(_grow(old, new_rows, init), requires_grad=old.requires_grad)
    emb.num_embeddings = old_rows + new_rows
    for module in model.modules():
        tied = [c for c in module.children() if isinstance(c, nn.Linear) and c.weight is old]
        for lin in tied:
            lin.weight = emb.weight
            lin.out_features = emb.num_embeddings
            if lin.bias is not None:
                lin.bias = nn.Parameter(_grow(lin.bias, new_rows, init), requires_grad=lin.bias.requires_grad)
        if tied:  # a per-token output bias beside the tied decoder (BERT's cls.predictions.bias)
            for name, p in list(module.named_parameters(recurse=False)):
                if p.dim() == 1 and p.shape[0] == old_rows:
                    setattr(module, name, nn.Parameter(_grow(p, new_rows, init), requires_grad=p.requires_grad))
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "vocab_size"):
            config.vocab_size = emb.num_embeddings
    return added
