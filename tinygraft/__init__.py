"""tinygraft: a from-scratch transformer training engine for the whole transfer-learning path.

Importing tinygraft never imports Triton (or transformers): the Triton paths import it when they first run.
"""

__version__ = "0.1.0"

from tinygraft.errors import TinygraftError  # noqa: E402
from tinygraft.kernels.lora import lora_linear  # noqa: E402
from tinygraft.peft.files import load_adapter, save_adapter  # noqa: E402
from tinygraft.peft.lora import (  # noqa: E402
    LoRALinear,
    add_lora,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

__all__ = [
    "TinygraftError",
    "LoRALinear",
    "add_lora",
    "load_adapter",
    "lora_linear",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
    "__version__",
]
