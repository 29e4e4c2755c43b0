"""Tensor ops: Triton kernels beside their PyTorch references, one public function per op.

Importing this package never imports Triton; a Triton path imports it when it first runs.
"""

from tinygraft.kernels.attention import flash_attention
from tinygraft.kernels.backend import backend_for, describe
from tinygraft.kernels.lora import lora_linear

__all__ = ["flash_attention", "lora_linear", "backend_for", "describe"]
