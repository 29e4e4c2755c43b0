"""Parameter-efficient adapters on any nn.Module, and peft's file layout for them.

The names below load their modules when first used (importing a submodule, `tinygraft.peft.adapters`, stays cheap).
"""

import importlib

_EXPORTS = {
    "add_adapter": "tinygraft.peft.api",
    **dict.fromkeys(
        (
            "set_adapter",
            "adapters_disabled",
            "mixed_batch",
            "train_adapters",
            "delete_adapter",
            "merge_adapter",
            "unmerge_adapter",
            "unload",
            "adapter_state_dict",
            "load_adapter_state_dict",
        ),
        "tinygraft.peft.adapters",
    ),  # fmt: skip
    "save_adapter": "tinygraft.peft.files",
    "load_adapter": "tinygraft.peft.files",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinygraft.peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
