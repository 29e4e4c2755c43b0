"""What the compile check builds: each op's launchers called on meta tensors, over the flags they can be asked for.

A case is one op and one shape class (the unit a launcher picks its candidate list by). Its `dims` list every value
each setting can take, the heaviest first (flags on, the largest head dim, bf16): the check builds every candidate
under the first values, and the other values at least once each. The calls go through the launchers (and, for the
fused ops, the very functions behind their custom ops), so the builds see the arguments a real launch passes.
Shapes are typical training shapes; only their specialisations (a stride of 1, multiples of 16) reach the code.
"""

import dataclasses
from collections.abc import Callable

import torch

from tinygraft.kernels import adamw_triton, attention_triton, bias_gelu_triton, kd_loss_triton, lora, lora_segmented

META = torch.device("meta")
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

# The short names launchers and launch_configs.json use, by kernel function.
KERNEL_NAMES = {
    "_attn_fwd": "fwd", "_attn_bwd_dkdv": "dkdv", "_attn_bwd_dq": "dq", "_attn_bwd_delta": "delta",
    "_attn_decode": "decode", "_attn_decode_combine": "combine",
    "_lowrank_matmul_kernel": "gemm", "_skinny_matmul_kernel": "skinny",
    "_seg_gemm_kernel": "gemm", "_seg_skinny_kernel": "skinny", "_seg_reduce_kernel": "reduce",
    "_bias_gelu_fwd_kernel": "fwd", "_bias_gelu_bwd_kernel": "bwd",
    "_adamw_kernel": "update", "_sq_norm_kernel": "sq_norm",
    "_kd_rows_kernel": "rows",
}  # fmt: skip


def kernel_name(fn) -> str:
    return KERNEL_NAMES.get(fn.__name__, fn.__name__)


@dataclasses.dataclass
class Case:
    kernel_prefix: str  # "attention"
    dims: dict[str, list]  # setting -> its values, heaviest first
    call: Callable[..., None]  # runs the launchers for one row of settings
    shape_class: Callable[..., str]  # the class a row falls in (as the launcher names it)


DEVICE = [META]  # `--tune` runs the cases on the GPU instead


def _empty(*shape, dtype):
    """A tensor of the shape: storage-free on meta; on a GPU random values (all True for a mask)."""
    device = DEVICE[-1]
    if device == META:
        return torch.empty(*shape, dtype=dtype, device=META)
    if dtype == torch.bool:
        return torch.ones(*shape, dtype=dtype, device=device)
    return torch.randn(*shape, device=device).to(dtype)


# ---------------------------------------------------------------------------------------------------- attention
def _attention(D, dtype, causal, pad, dropout, ieee=True, gqa=False):
    B, Hq, T = 2, 8, 1024
    Hkv = 2 if gqa else Hq
    q = _empty(B, Hq, T, D, dtype=dtype)
    k, v = _empty(B, Hkv, T, D, dtype=dtype), _empty(B, Hkv, T, D, dtype=dtype)
    mask = _empty(B, T, dtype=torch.bool) if pad else None
    p = 0.1 if dropout else 0.0
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if ieee else "high")
    try:
        out, lse = attention_triton._forward(q, k, v, mask, causal, D**-0.5, p, 7)
        attention_triton._backward(q, q, k, v, out, lse, mask, causal, D**-0.5, p, 7)
    finally:
        torch.set_float32_matmul_precision(before)


def _attention_class(D, dtype, **_):
    return attention_triton.shape_class(D, dtype)


FLAGS = {"causal": [True, False], "pad": [True, False], "dropout": [True, False]}


def _decode(D, dtype, causal, pad, gqa, ieee=True):
    """One decode step (T = 1) against a 4096-key cache: the split-key kernel and its combine."""
    B, Hq, S = 4, 8, 4096
    Hkv = 2 if gqa else Hq
    q = _empty(B, Hq, 1, D, dtype=dtype)
    k, v = _empty(B, Hkv, S, D, dtype=dtype), _empty(B, Hkv, S, D, dtype=dtype)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if ieee else "high")
    try:
        attention_triton._forward(q, k, v, _empty(B, S, dtype=torch.bool) if pad else None, causal, D**-0.5, 0.0, 0)
    finally:
        torch.set_float32_matmul_precision(before)


DECODE_FLAGS = {"causal": [True, False], "pad": [True, False], "gqa": [True, False]}
ATTENTION = [
    Case("attention", {"D": [64, 32, 16], "dtype": [BF16, FP16], **FLAGS, "gqa": [True, False]}, _attention,
         _attention_class),
    Case("attention", {"D": [128], "dtype": [BF16, FP16], **FLAGS, "gqa": [True, False]}, _attention,
         _attention_class),
    Case("attention", {"D": [64], "dtype": [FP32], **FLAGS, "ieee": [True, False]}, _attention, _attention_class),
    Case("attention", {"D": [128], "dtype": [FP32], **FLAGS, "ieee": [True, False]}, _attention, _attention_class),
    Case("attention", {"D": [64, 32, 16], "dtype": [BF16, FP16], **DECODE_FLAGS}, _decode, _attention_class),
    Case("attention", {"D": [128], "dtype": [BF16, FP16], **DECODE_FLAGS}, _decode, _attention_class),
    Case("attention", {"D": [64, 128], "dtype": [FP32], **DECODE_FLAGS, "ieee": [True, False]}, _decode,
         _attention_class),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- LoRA
def _lora(dtype, bias, dropout, ieee=True):
    M, K, N, r = 4096, 1024, 1024, 16
    x, w = _empty(M, K, dtype=dtype), _empty(N, K, dtype=dtype)
    a, b = _empty(r, K, dtype=dtype), _empty(N, r, dtype=dtype)
    p = 0.1 if dropout else 0.0
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not ieee
    try:  # the functions behind the custom ops: forward, then the backward with every gradient asked for
        y, s = lora._lora_linear_op._init_fn(x, w, _empty(N, dtype=dtype) if bias else None, a, b, 2.0, p, 7)
        lora._lora_linear_backward_op._init_fn(y, x, w, a, b, s, 2.0, p, 7, [True, True, bias, True, True])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _lora_class(dtype, **_):
    return "fp32" if dtype == FP32 else "16bit"


LORA = [
    Case("lora", {"dtype": [BF16, FP16], "bias": [True, False], "dropout": [True, False]}, _lora, _lora_class),
    Case("lora", {"dtype": [FP32], "bias": [True, False], "dropout": [True, False], "ieee": [True, False]}, _lora,
         _lora_class),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- segmented LoRA
def _lora_segmented(dtype, bias, dropout, ieee=True):
    """A mixed batch: 8 adapters, every row one of them or the base alone (a real plan on a GPU, for --tune)."""
    M, K, N, r, G = 4096, 1024, 1024, 16, 8
    x, w = _empty(M, K, dtype=dtype), _empty(N, K, dtype=dtype)
    a, b = _empty(G, r, K, dtype=dtype), _empty(G, N, r, dtype=dtype)
    scaling = _empty(G, dtype=FP32)
    ids = torch.arange(M, device=DEVICE[-1]) % (G + 1) - 1
    block_m = lora_segmented.tile_rows()
    plan = (*lora_segmented.plan_rows(ids, G, block_m), block_m)
    p = [0.1] * G if dropout else [0.0] * G
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not ieee
    try:  # the functions behind the custom ops; dW is lora's own GEMM (the LoRA case builds it), so not asked for
        y, s = lora_segmented._segmented_op._init_fn(x, w, _empty(N, dtype=dtype) if bias else None, a, b, scaling,
                                                     *plan, p, 7)  # fmt: skip
        lora_segmented._segmented_backward_op._init_fn(y, x, w, a, b, s, scaling, *plan, p, 7,
                                                       [True, False, bias, True, True])  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


LORA_SEGMENTED = [
    Case("lora_segmented", {"dtype": [BF16, FP16], "bias": [True, False], "dropout": [True, False]}, _lora_segmented,
         _lora_class),
    Case("lora_segmented", {"dtype": [FP32], "bias": [True, False], "dropout": [True, False], "ieee": [True, False]},
         _lora_segmented, _lora_class),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- bias + GELU
def _bias_gelu(dtype, tanh):
    x, b = _empty(8192, 3072, dtype=dtype), _empty(3072, dtype=dtype)
    approximate = "tanh" if tanh else "none"
    bias_gelu_triton.bias_gelu_fwd(x, b, approximate)
    bias_gelu_triton.bias_gelu_bwd(x, x, b, approximate)


BIAS_GELU = [
    Case("bias_gelu", {"dtype": [BF16, FP16, FP32, FP64], "tanh": [True, False]}, _bias_gelu,
         lambda dtype, **_: bias_gelu_triton.shape_class(dtype)),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- AdamW
def _adamw(p_dtype, master, clip):
    master = master and p_dtype in (BF16, FP16)
    s_dtype = FP32 if master else p_dtype  # as AdamW keeps its state
    shapes = [(1024, 1024), (4096,), (7, 129)]
    rows = [
        (_empty(*s, dtype=p_dtype), _empty(*s, dtype=p_dtype), _empty(*s, dtype=s_dtype), _empty(*s, dtype=s_dtype),
         _empty(*s, dtype=FP32) if master else None)
        for s in shapes
    ]  # fmt: skip
    hyper = _empty(len(rows), 9, dtype=FP64 if p_dtype == FP64 else FP32)
    group = adamw_triton.Group(rows, hyper, DEVICE[-1])
    adamw_triton.grad_sq_norm(group, p_dtype)
    adamw_triton.launch_update(group, p_dtype, s_dtype, master, _empty((), dtype=FP32) if clip else None)


ADAMW = [
    Case("adamw", {"p_dtype": [BF16, FP16, FP32, FP64], "master": [True, False], "clip": [True, False]}, _adamw,
         lambda **_: "all"),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- KD loss
def _kd_loss(dtype, divergence):
    """One chunk of 1,024 rows over GPT-2's vocabulary (50,257: not a multiple of any BLOCK_V), some rows ignored."""
    rows, V = 1024, 50257
    s, t = _empty(rows, V, dtype=dtype), _empty(rows, V, dtype=dtype)
    kd_loss_triton.kd_rows(s, t, _empty(rows, dtype=torch.bool), _empty((), dtype=FP32), 2.0, divergence, 0.5)


# JSD first: its passes hold the most live tiles. fp32 is a case of its own so that its every candidate is built
# under JSD too (a class is built whole only in the first row that reaches it).
KD_LOSS = [
    Case("kd_loss", {"dtype": [BF16, FP16], "divergence": ["jsd", "reverse", "forward"]}, _kd_loss,
         lambda dtype, **_: kd_loss_triton.shape_class(dtype)),
    Case("kd_loss", {"dtype": [FP32], "divergence": ["jsd", "reverse", "forward"]}, _kd_loss,
         lambda dtype, **_: kd_loss_triton.shape_class(dtype)),
]  # fmt: skip

CASES = [*ATTENTION, *LORA, *LORA_SEGMENTED, *BIAS_GELU, *ADAMW, *KD_LOSS]
