"""GPT and BERT built from tinygraft.core blocks (each with its Hugging Face name mapping), their presets, the task
model a head sits in, sentence pooling, and pretrained directories (models/pretrained.py, models/hf.py)."""

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
