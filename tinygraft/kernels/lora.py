"""Fused LoRA linear layer: the frozen base matmul and the low-rank update in one pass (Hu et al. 2021, LoRA).

Forward, for x (..., in) flattened to (M, in), W (out, in), A (r, in), B (out, r), bias b (out,):

    M_drop = keep_mask(seed, row * in + col) / (1 - p)      dropout on the adapter's input only
    s = (M_drop ⊙ x) @ A^T                                  (M, r), computed once, saved for backward
    y = x @ W^T + b + scaling * s @ B^T                     (M, out), one GEMM: the r-wide step shares its tile

Backward, with dY (M, out):

    g  = dY @ B                                             (M, r)
    dX = dY @ W + scaling * M_drop ⊙ (g @ A)                (M, in), one GEMM the same way
    dA = scaling * g^T @ (M_drop ⊙ x)                       (r, in), the mask regenerated, never stored
    dB = scaling * dY^T @ s                                 (out, r)
    dW = dY^T @ x,  db = sum over rows of dY                only when W / b require grad (usually frozen)

Unfused, eager PyTorch writes y twice to memory (x @ W^T, then the sum with the low-rank term) and keeps
dropout(x) for backward; the kernels in `lora_triton.py` avoid both (LoRAFusion, Zhu et al. 2025, measures the
same fusion at 1.27x on average). fp32, fp16 and bf16 inputs accumulate in fp32; r is any size (one padded tile
up to 128). On CUDA the Triton path runs, elsewhere the reference below; TINYGRAFT_BACKEND forces one.
"""

import torch
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.kernels import backend, rng

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, weight, bias, lora_a, lora_b, dropout_p):
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise TinygraftError(
            f"lora_linear needs 2-d weight, lora_a and lora_b; got {weight.dim()}-d, {lora_a.dim()}-d, {lora_b.dim()}-d"
        )
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise TinygraftError(
            f"lora_linear input's last dim is {tuple(x.shape)[-1:]} but the weight is (out, in) = {tuple(weight.shape)}"
        )
    if tuple(lora_a.shape) != (r, in_f) or tuple(lora_b.shape) != (out_f, r) or r == 0:
        raise TinygraftError(
            f"lora_linear needs lora_a (r, {in_f}) and lora_b ({out_f}, r) with r >= 1; got "
            f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise TinygraftError(f"lora_linear bias must be ({out_f},); got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise TinygraftError(f"lora_linear dropout_p must be in [0, 1); got {dropout_p}")


def _check_kernel_dtypes(*tensors):
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or not dtypes <= set(KERNEL_DTYPES):
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise TinygraftError(
            f"lora_linear's Triton kernel needs x, weight, bias and adapters in one dtype out of "
            f"float32/float16/bfloat16; got {names} (cast them, or run under autocast)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Custom-op glue: opaque to torch.compile (no graph break), Triton imported only when the op runs.


@torch.library.custom_op("tinygraft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from tinygraft.kernels import lora_triton as kt

    in_f = x.shape[1]
    s = kt.skinny_matmul(
        x, lora_a.t(), alpha=1.0 / (1.0 - dropout_p), dropout_p=dropout_p, seed=seed, mask_strides=(in_f, 1)
    )
    y = kt.lowrank_matmul(x, weight.t(), s, lora_b.t(), bias, scale=scaling)
    return y, s


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("tinygraft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db, dA, dB); a gradient not in `needs` comes back as an empty tensor."""
    from tinygraft.kernels import lora_triton as kt

    need_x, need_w, need_bias, need_a, need_b = needs
    in_f = x.shape[1]
    keep = 1.0 / (1.0 - dropout_p)

    def empty():  # a fresh one each time: a custom op's outputs may not alias each other
        return grad_y.new_empty(0)

    g = kt.skinny_matmul(grad_y, lora_b)  # (M, r)
    dx = (
        kt.lowrank_matmul(grad_y, weight, g, lora_a, scale=scaling * keep, dropout_p=dropout_p, seed=seed)
        if need_x
        else empty()
    )
    dw = kt.lowrank_matmul(grad_y.t(), x, out_dtype=weight.dtype) if need_w else empty()
    db = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype) if need_bias else empty()
    da = empty()
    if need_a:
        # dA^T (in, r) = drop(x)^T @ g, written straight into dA's transpose; x^T[m, k] is x's index k * in + m.
        da = torch.empty_like(lora_a)
        kt.skinny_matmul(
            x.t(), g, alpha=scaling * keep, dropout_p=dropout_p, seed=seed, mask_strides=(1, in_f), out=da.t()
        )
    db_lora = kt.skinny_matmul(grad_y.t(), s, alpha=scaling) if need_b else empty()
    return dx, dw, db, da, db_lora


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(grad_y.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling, ctx.dropout_p, ctx.seed, ctx.has_bias = scaling, dropout_p, seed, bias is not None


def _backward(ctx, grad_y, _grad_s):
    x, weight, lora_a, lora_b, s = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
    grads = torch.ops.tinygraft.lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, ctx.seed, needs
    )
    dx, dw, db, da, db_lora = (grad if wanted else None for grad, wanted in zip(grads, needs))
    return dx, dw, db, da, db_lora, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# The public function.


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    """y = x @ W^T + b + scaling * (M ⊙ x / (1 - p)) @ A^T @ B^T for x (..., in), W (out, in), A (r, in), B (out, r).

    `bias` may be None. With dropout_p > 0 the mask is a function of `seed` (drawn from torch's RNG when None)
    and the element's position in x flattened to (tokens, in); `lora_linear_reference` reproduces it bit for bit.
    Under autocast every input is cast to the dtype autocast gives a matmul, as `F.linear` would be.
    """
    _check(x, weight, bias, lora_a, lora_b, dropout_p)
    cast_to = backend.autocast_dtype(x.device.type)
    if cast_to is not None:
        x, weight, lora_a, lora_b = (t.to(cast_to) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(cast_to) if bias is not None else None
    if dropout_p > 0.0 and seed is None:
        seed = rng.new_seed()
    if backend.backend_for(x, weight, bias, lora_a, lora_b) == "reference":
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    _check_kernel_dtypes(x, weight, bias, lora_a, lora_b)
    lead = x.shape[:-1]
    y, _ = torch.ops.tinygraft.lora_linear(
        x.reshape(-1, x.shape[-1]),
        weight,
        bias,
        lora_a,
        lora_b,
        float(scaling),
        float(dropout_p),
        rng.kernel_seed(int(seed)) if dropout_p > 0.0 else 0,
    )
    return y.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# The reference: plain differentiable PyTorch, the definition of the right answer (run it in float64 to check).


def dropout_keep(seed: int, dropout_p: float, x: torch.Tensor) -> torch.Tensor:
    """The keep-mask (shape of x) the kernel draws: index = row * in + col of x flattened to (tokens, in)."""
    return rng.keep_mask_like(seed, tuple(x.shape), dropout_p, device=x.device)


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    y = F.linear(x, weight, bias)
    if dropout_p > 0.0:
        x = x * dropout_keep(seed, dropout_p, x).to(x.dtype) / (1.0 - dropout_p)
    return y + scaling * F.linear(F.linear(x, lora_a), lora_b)
