"""Prompt tuning and prefix tuning on our GPT and BERT: learned vectors the model reads as if they were tokens.

    prompt tuning (Lester et al. 2021)    N learned embeddings prepended to the input:  [P_1 .. P_N, x_1 .. x_T]
                                          they take positions 0..N-1 (the real tokens N..N+T-1), as in peft
    prefix tuning (Li & Liang 2021)       per layer l, N learned keys and values prepended to that layer's own:
                                          attention over [K_l^prefix ; K], [V_l^prefix ; V]; no positions taken by
                                          default (--prefix-positions after: the real tokens start at N, as peft's
                                          transformers models count them)

Both live in one adapter layer around the token embedding (`VirtualTokens`): its forward is the embedding's, and the
model asks it for the active adapter's prompt (`input_prompt`) and each layer's prefix (`layer_prefix`). The model
extends the padding mask over them and hands its task head only the real positions, so pooling, token tags and QA
spans read what they read without an adapter. Causal attention is aligned bottom-right (kernels/attention.py), so a
prefix is visible to every query. Disabling the adapter (set_adapter(None), adapters_disabled) restores the base's
outputs exactly; neither method merges into weights.

Tensors keep peft's names and shapes, which keeps peft's files (peft/files.py) a matter of dropping the path:
`prompt_embeddings` (N, C) for prompt tuning; (N, layers * 2 * C) for prefix tuning, laid out (layer, key|value,
head, head dim) along the last axis as peft's `get_prompt` reads it. Prefix tuning's optional reparametrisation
(`--prefix-projection`: an MLP from N C-vectors to the prefixes, which trains more stably) is folded into that plain
tensor when saved.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from tinygraft.core.config import setting
from tinygraft.errors import TinygraftError
from tinygraft.peft import adapters
from tinygraft.peft.adapters import DEFAULT_ADAPTER, AdapterLayer

EMBEDDINGS = ("transformer.wte", "embeddings.word_embeddings")  # GPT's and BERT's token embeddings
VOCAB_SAMPLE = 5000  # Lester et al. sample the initial prompt from the 5,000 most common tokens


def _virtual_tokens_setting():
    """The flag prompt and prefix tuning share (one --num-virtual-tokens: the same default and help)."""
    return setting(20, "learned virtual tokens per example (prompt tuning's take the model's positions, prefix "
                       "tuning's none by default)", flag="num-virtual-tokens")  # fmt: skip


@dataclass(frozen=True)
class PromptConfig:
    """One prompt-tuning adapter's settings."""

    num_virtual_tokens: int = _virtual_tokens_setting()
    prompt_init: str = setting(
        "vocab",
        '"vocab" (embeddings of sampled vocabulary tokens, as Lester et al.), "random" (N(0, 1), peft\'s), or '
        '"text:WORDS" (the embeddings of those words\' tokens, repeated to fill)',
        flag="prompt-init",
    )

    def __post_init__(self):
        _check_count(self.num_virtual_tokens)
        if self.prompt_init not in ("vocab", "random") and not self.prompt_init.startswith("text:"):
            raise TinygraftError(f'--prompt-init must be "vocab", "random" or "text:WORDS"; got {self.prompt_init!r}')


@dataclass(frozen=True)
class PrefixConfig:
    """One prefix-tuning adapter's settings."""

    num_virtual_tokens: int = _virtual_tokens_setting()
    prefix_projection: bool = setting(
        False,
        "train the prefixes through an MLP (Li & Liang's reparametrisation), folded into plain prefixes when saved",
        flag="prefix-projection",
    )
    prefix_hidden: int = setting(512, "the reparametrisation MLP's hidden width", flag="prefix-hidden")
    prefix_positions: Literal["none", "after"] = setting(
        "none",
        '"none": the prefix takes no positions; "after": the real tokens are numbered from N, as peft counts them '
        "(needed to export the adapter for peft)",
        flag="prefix-positions",
    )

    def __post_init__(self):
        _check_count(self.num_virtual_tokens)
        if not (isinstance(self.prefix_hidden, int) and self.prefix_hidden >= 1):
            raise TinygraftError(f"--prefix-hidden must be a positive integer; got {self.prefix_hidden!r}")


def _check_count(n) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise TinygraftError(f"--num-virtual-tokens must be a positive integer; got {n!r}")


class VirtualTokens(AdapterLayer):
    """The token embedding, unchanged, plus named prompt or prefix adapters the model reads around it."""

    kind = "prompt/prefix"

    def __init__(self, base: nn.Embedding, n_layer: int, n_head: int):
        if not isinstance(base, nn.Embedding):
            raise TinygraftError(f"prompt and prefix tuning wrap the token embedding, not {type(base).__name__}")
        super().__init__(base)
        self.n_layer, self.n_head, self.dim = n_layer, n_head, base.embedding_dim
        self.prompt_embeddings = nn.ParameterDict()  # name -> (N, C) prompt, (N, L*2*C) prefix, or (N, C) MLP input
        self.prefix_mlp = nn.ModuleDict()  # reparametrised prefixes: name -> C -> hidden -> L*2*C

    @property
    def weight(self) -> torch.Tensor:  # the LM head is tied to it; code reading `wte.weight` keeps working
        return self.base.weight

    def is_prefix(self, name: str) -> bool:
        return isinstance(self.settings[name], PrefixConfig)

    def _create(self, name: str, config) -> None:
        w = self.base.weight
        n = config.num_virtual_tokens
        make = lambda *shape: torch.empty(*shape, device=w.device, dtype=w.dtype)  # noqa: E731
        if isinstance(config, PromptConfig):
            self.prompt_embeddings[name] = nn.Parameter(make(n, self.dim).normal_())
            return
        if config.prefix_projection:
            self.prompt_embeddings[name] = nn.Parameter(make(n, self.dim).normal_())
            h, out = config.prefix_hidden, self.n_layer * 2 * self.dim
            self.prefix_mlp[name] = nn.Sequential(
                nn.Linear(self.dim, h, device=w.device, dtype=w.dtype),
                nn.Tanh(),
                nn.Linear(h, out, device=w.device, dtype=w.dtype),
            )
        else:
            self.prompt_embeddings[name] = nn.Parameter(make(n, self.n_layer * 2 * self.dim).normal_())

    @torch.no_grad()
    def init_from_tokens(self, name: str, ids: torch.Tensor) -> None:
        """A prompt starts as the embeddings of these token ids (repeated or cut to N)."""
        n = self.settings[name].num_virtual_tokens
        ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n].to(self.base.weight.device)
        self.prompt_embeddings[name].copy_(self.base.weight[ids])

    def _forget(self, name: str) -> None:
        del self.prompt_embeddings[name]
        if name in self.prefix_mlp:
            del self.prefix_mlp[name]

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        tensors = {"prompt_embeddings": self.prompt_embeddings[name]}
        if name in self.prefix_mlp:
            tensors.update({f"prefix_mlp.{k}": v for k, v in self.prefix_mlp[name].named_parameters()})
        return tensors

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self._table(name).detach()}

    def _table(self, name: str) -> torch.Tensor:
        """The adapter's (N, C) prompt or (N, L*2*C) prefixes, through the MLP when reparametrised."""
        p = self.prompt_embeddings[name]
        return self.prefix_mlp[name](p) if name in self.prefix_mlp else p

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base(idx)

    def weight_change(self, name: str) -> dict[str, torch.Tensor]:
        return {}  # modules beside the base; its tensors stay as they were

    def _fold(self, name: str, undo: bool) -> None:
        raise TinygraftError("prompt and prefix tuning add virtual tokens, not weights, so they do not merge into "
                             "the base; export the adapter with --adapter DIR")  # fmt: skip

    # ------------------------------------------------------------------------------------------ what models ask
    def _rows(self, batch: int, prefix: bool) -> tuple[list[str], torch.Tensor | None] | None:
        """The adapters the batch's rows use (all rows the active one, or a mixed batch's), and each row's index
        into them (None: one adapter for every row); None when no row has an adapter of this kind."""
        if self.row_adapters is None:
            name = self.active_adapter
            if name is None or self.is_prefix(name) != prefix:
                return None
            return [name], None
        names, idx = self.row_groups(self.base.weight.device)
        self.rows_of(batch)
        kinds = {self.is_prefix(n) for n in names}
        if not names or kinds == {not prefix}:
            return None
        counts = {self.settings[n].num_virtual_tokens for n in names}
        if (idx < 0).any() or len(kinds) > 1 or len(counts) > 1:
            raise TinygraftError(
                "in a mixed batch, prompt- and prefix-tuned rows take virtual positions every row must share: each "
                "row needs an adapter of the same kind with the same --num-virtual-tokens"
            )
        return names, idx

    def _gather(self, names: list[str], idx: torch.Tensor | None, batch: int) -> torch.Tensor:
        tables = [self._table(n) for n in names]
        if idx is None:
            return tables[0].unsqueeze(0).expand(batch, *tables[0].shape)
        return torch.stack(tables)[idx]  # (B, N, width): each row its own adapter's

    def _current(self) -> str | None:
        """The adapter whose lengths the batch takes: the active one, or a mixed batch's first on this layer (its
        rows all share one kind and length, `_rows` checks)."""
        if self.row_adapters is None:
            return self.active_adapter
        return next((n for n in self.row_adapters if n in self.settings), None)

    def virtual_count(self) -> int:
        """Virtual positions the active adapter's prompt takes (0 for a prefix or none)."""
        name = self._current()
        return self.settings[name].num_virtual_tokens if name is not None and not self.is_prefix(name) else 0

    def prefix_count(self) -> tuple[int, bool]:
        """(prefix length, whether the real tokens' positions start after it) of the active prefix adapter."""
        name = self._current()
        if name is None or not self.is_prefix(name):
            return 0, False
        config = self.settings[name]
        return config.num_virtual_tokens, config.prefix_positions == "after"

    def input_prompt(self, batch: int) -> torch.Tensor | None:
        """(B, N, C) virtual token embeddings to prepend, or None."""
        found = self._rows(batch, prefix=False)
        return None if found is None else self._gather(*found, batch)

    def layer_prefixes(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each layer's (keys, values) prefix, (B, H, N, D) each, or None."""
        found = self._rows(batch, prefix=True)
        if found is None:
            return None
        table = self._gather(*found, batch)  # (B, N, L*2*C)
        B, N = table.shape[:2]
        kv = table.view(B, N, self.n_layer * 2, self.n_head, self.dim // self.n_head).permute(2, 0, 3, 1, 4)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.n_layer)]

    def extra_repr(self) -> str:
        kind = lambda n: "prefix" if self.is_prefix(n) else "prompt"  # noqa: E731
        shown = ", ".join(f"{n}: {kind(n)} of {s.num_virtual_tokens}" for n, s in self.settings.items())
        return f"active={self.active_adapter!r}, adapters=[{shown}]"


# ---------------------------------------------------------------------------------------------------------------
# Model surgery.


def _embedding_path(model: nn.Module) -> str:
    names = dict(model.named_modules())
    for path in names:
        if any(adapters.path_matches(path, [e]) for e in EMBEDDINGS):
            if not isinstance(names[path], (nn.Embedding, VirtualTokens)):
                break
            return path
    raise TinygraftError("prompt and prefix tuning work on tinygraft's GPT and BERT (their token embedding "
                         "`transformer.wte` / `embeddings.word_embeddings`); this model has neither")  # fmt: skip


def _shape(model: nn.Module) -> tuple[int, int]:
    found = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "n_layer")]
    if not found:
        raise TinygraftError("prompt and prefix tuning need a tinygraft GPT or BERT (a config with n_layer, n_head)")
    return found[0].n_layer, found[0].n_head


def _wrap(model: nn.Module) -> VirtualTokens:
    path = _embedding_path(model)
    module = model.get_submodule(path)
    if not isinstance(module, VirtualTokens):
        module = VirtualTokens(module, *_shape(model))
        adapters.replace(model, path, module)
    return module


def _add(model, config, adapter_name, freeze_base) -> tuple[VirtualTokens, int]:
    layer = _wrap(model)
    layer.add_adapter(adapter_name, config)
    adapters.set_adapter(model, adapter_name)
    return layer, adapters.train_only(model, adapter_name, freeze_base)


def add_prompt_tuning(
    model: nn.Module,
    num_virtual_tokens: int = 20,
    init: str = "vocab",
    init_ids: torch.Tensor | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    freeze_base: bool = True,
    generator: torch.Generator | None = None,
) -> int:
    """A prompt of `num_virtual_tokens` learned embeddings before every input; "vocab" starts it from sampled token
    embeddings, "text:..." from `init_ids` (that text's token ids, which the caller's tokenizer gives). Returns the
    trainable count (everything else frozen unless `freeze_base=False`)."""
    config = PromptConfig(num_virtual_tokens, init)
    layer, n = _add(model, config, adapter_name, freeze_base)
    if init == "vocab":
        common = min(VOCAB_SAMPLE, layer.base.num_embeddings)
        layer.init_from_tokens(adapter_name, torch.randint(common, (num_virtual_tokens,), generator=generator))
    elif init.startswith("text:"):
        if init_ids is None or len(init_ids) == 0:
            raise TinygraftError(f"--prompt-init {init!r} gives no tokens to start the prompt from")
        layer.init_from_tokens(adapter_name, torch.as_tensor(init_ids, dtype=torch.long))
    return n


def add_prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int = 20,
    projection: bool = False,
    hidden: int = 512,
    positions: str = "none",
    adapter_name: str = DEFAULT_ADAPTER,
    freeze_base: bool = True,
) -> int:
    """Learned keys and values before every layer's own, `num_virtual_tokens` of them (through an MLP while training
    when `projection`); returns the trainable count."""
    if positions not in ("none", "after"):
        raise TinygraftError(f'prefix positions are "none" or "after", not {positions!r}')
    return _add(model, PrefixConfig(num_virtual_tokens, projection, hidden, positions), adapter_name, freeze_base)[1]


def virtual_layers(model: nn.Module) -> Iterator[tuple[str, VirtualTokens]]:
    return adapters.adapter_layers(model, VirtualTokens)


def virtual_tokens_of(module: nn.Module) -> VirtualTokens | None:
    """The model's token embedding when it carries prompt or prefix adapters (what GPT and BERT ask)."""
    return module if isinstance(module, VirtualTokens) else None


def prompt_settings(model: nn.Module, adapter_name: str | None = None) -> tuple[str, object, VirtualTokens]:
    """(path, config, layer) of a prompt or prefix adapter (default: the active one)."""
    for path, layer in virtual_layers(model):
        name = layer.adapter_in(adapter_name)
        if name is not None:
            return path, layer.settings[name], layer
    raise TinygraftError(f"the model has no prompt or prefix adapter {adapter_name or '(active)'!r}")
