"""Fused bias + GELU, the elementwise half of a transformer MLP: y = gelu(x + bias).

    h = x + b                                   x (..., N), b (N,) broadcast over the rows
    tanh form (GPT-2):  y = 0.5 h (1 + tanh(u)),  u = sqrt(2/pi) (h + 0.044715 h^3)      (Hendrycks & Gimpel 2016)
                        dy/dh = s + 2 h s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 h^2),  s = sigmoid(2u) = (1 + tanh u) / 2
    erf form ("none", BERT): y = h Phi(h),  Phi(h) = (1 + erf(h / sqrt 2)) / 2
                        dy/dh = Phi(h) + h phi(h),  phi(h) = exp(-h^2 / 2) / sqrt(2 pi)
    backward:  dx = dy * dy/dh      dbias = sum over rows of dx (in fp32)

One read of x and bias, one write of y, against three passes for an unfused `gelu(x + b)` that stores h; the
backward recomputes h from x and bias rather than saving it.

Dtypes: y and dx take x's dtype, dbias takes the bias's; the arithmetic is fp32 (fp64 for fp64 inputs). Under
autocast the op runs in the dtype of x, as an elementwise op should: an autocast matmul output arrives as bf16/fp16
and stays so, the fp32 bias is read and added in fp32 (never rounded to bf16 first), and fp32 x stays fp32.

The Triton kernels live in bias_gelu_triton.py (imported only when the Triton path runs); here are the custom-op
glue, the public function and the reference.
"""

import torch

from tinygraft.errors import TinygraftError
from tinygraft.kernels.backend import backend_for

APPROXIMATIONS = ("tanh", "none")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- custom-op glue: opaque to torch.compile, differentiable through its own backward op ----


@torch.library.custom_op("tinygraft::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    from tinygraft.kernels.bias_gelu_triton import bias_gelu_fwd

    return bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("tinygraft::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(
    grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from tinygraft.kernels.bias_gelu_triton import bias_gelu_bwd

    return bias_gelu_bwd(grad, x, bias, approximate)


@_bias_gelu_backward_op.register_fake
def _(grad, x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, dbias = _bias_gelu_backward_op(grad, x, bias, ctx.approximate)
    return dx, dbias, None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ----


def _check(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise TinygraftError(f"bias_gelu approximate={approximate!r} is not one of {', '.join(APPROXIMATIONS)}")
    if x.dim() < 1 or bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise TinygraftError(
            f"bias_gelu needs x (..., N) and bias (N,); got x {tuple(x.shape)} and bias {tuple(bias.shape)}"
        )
    if x.dtype not in _DTYPES or bias.dtype not in _DTYPES:
        raise TinygraftError(f"bias_gelu needs floating tensors; got x {x.dtype} and bias {bias.dtype}")
    if x.device != bias.device:
        raise TinygraftError(f"bias_gelu got x on {x.device} but bias on {bias.device}; move them to one device")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x + bias) over the last dim of x, in x's dtype; approximate="tanh" (GPT-2) or "none" (erf, BERT).

    Triton on CUDA tensors, the reference elsewhere; TINYGRAFT_BACKEND=triton|reference forces one.
    """
    _check(x, bias, approximate)
    if backend_for(x, bias) == "triton":
        return _bias_gelu_op(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)


# ---- reference: the definition of the right answer (run it in float64 to check the kernel) ----


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Plain differentiable torch: x + bias promotes (bf16 x, fp32 bias: fp32); the result takes x's dtype."""
    return torch.nn.functional.gelu(x + bias, approximate=approximate).to(x.dtype)
