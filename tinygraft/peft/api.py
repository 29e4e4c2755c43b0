"""Many adapters on one base, by method name: what a user's own script calls.

    from tinygraft.peft import add_adapter, set_adapter, adapters_disabled, delete_adapter
    add_adapter(model, "lora", name="sst2", r=8, targets=["query", "value"])
    add_adapter(model, "lora", name="docs", r=4, targets=["query", "value"])      # same layers, second adapter
    add_adapter(model, "ia3", name="tags", targets=["key", "value", "output.dense"], feedforward=["output.dense"])
    set_adapter(model, "docs")                 # switching copies nothing: every adapter sits beside the base
    with adapters_disabled(model): ...         # the base alone

A layer holds adapters of one method (a LoRA layer more LoRA adapters, ...); methods on different layers mix freely
(prompt and prefix tuning share one layer, the token embedding).
"""

import inspect
from collections.abc import Callable

from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.peft.adapters import DEFAULT_ADAPTER
from tinygraft.peft.bottleneck import add_bottleneck
from tinygraft.peft.ia3 import add_ia3
from tinygraft.peft.lora import add_lora
from tinygraft.peft.prompt import add_prefix_tuning, add_prompt_tuning


def _dora(model, **settings):
    return add_lora(model, use_dora=True, **settings)


def _bottleneck(variant: str) -> Callable:
    return lambda model, **settings: add_bottleneck(model, variant, **settings)


ADDERS: dict[str, Callable] = {
    "lora": add_lora,
    "dora": _dora,
    "ia3": add_ia3,
    "houlsby": _bottleneck("houlsby"),
    "pfeiffer": _bottleneck("pfeiffer"),
    "prompt-tuning": add_prompt_tuning,
    "prefix-tuning": add_prefix_tuning,
}


def add_adapter(model: nn.Module, method: str, name: str = DEFAULT_ADAPTER, **settings) -> int:
    """Add a named adapter of `method` (lora, dora, ia3, houlsby, pfeiffer, prompt-tuning, prefix-tuning; the last two
    on tinygraft's GPT and BERT) to `model` in place and make it the
    active one; the settings are the method's `add_*` keywords (r, alpha, targets, ...). Returns the trainable count
    (the new adapter's, every other parameter frozen)."""
    if method not in ADDERS:
        raise TinygraftError(f"unknown adapter method {method!r}; known: {', '.join(ADDERS)}")
    add = {"dora": add_lora, "houlsby": add_bottleneck, "pfeiffer": add_bottleneck}.get(method, ADDERS[method])
    known = [p for p in inspect.signature(add).parameters if p not in ("model", "variant", "adapter_name", "use_dora")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TinygraftError(f"{method} adapters have no setting {unknown[0]!r} (theirs: {', '.join(known)})")
    return ADDERS[method](model, adapter_name=name, **settings)
