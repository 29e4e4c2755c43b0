"""Tensor ops: Triton kernels beside their PyTorch references, one public function per op.

Importing this package never imports Triton; a Triton path imports it when it first runs.
"""

from tinygraft.kernels.adamw import FusedAdamW
from tinygraft.kernels.attention import flash_attention
from tinygraft.kernels.backend import backend_for, describe
from tinygraft.kernels.bias_gelu import bias_gelu
from tinygraft.kernels.lora import lora_linear

__all__ = ["FusedAdamW", "bias_gelu", "flash_attention", "lora_linear", "backend_for", "describe"]
