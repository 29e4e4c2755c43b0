"""GPT and BERT built from tinygraft.core blocks, their presets, and (later) task heads and the HF layout."""

from tinygraft.models.bert import BERT, BERTConfig, BERTForMaskedLM
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.presets import PRESETS, build_model, family, get_preset

__all__ = [
    "BERT",
    "BERTConfig",
    "BERTForMaskedLM",
    "GPT",
    "GPTConfig",
    "PRESETS",
    "build_model",
    "family",
    "get_preset",
]
