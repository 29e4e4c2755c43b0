"""tinygraft: a from-scratch transformer training engine for the whole transfer-learning path.

Importing tinygraft imports nothing heavy: the names below load their modules (and torch) when first used, so the
command line starts, and answers Ctrl-C, before torch is read. Triton (and transformers) are never imported here:
the Triton paths import it when they first run.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "TinygraftError": "tinygraft.errors",
    "lora_linear": "tinygraft.kernels.lora",
    "load_adapter": "tinygraft.peft.files",
    "save_adapter": "tinygraft.peft.files",
    **dict.fromkeys(
        ("LoRALinear", "add_lora", "lora_state_dict", "merge_lora", "unload_lora", "unmerge_lora"),
        "tinygraft.peft.lora",
    ),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinygraft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
