"""Segmented (multi-adapter) LoRA linear: every row of a batch with its own adapter, in one launch per product.

G adapters are stacked and padded to one rank r: A (G, r, in), B (G, out, r) (an adapter of rank r_g < r has zero
rows r_g.. of A_g and zero columns of B_g, which add nothing). Row m of x (..., in), flattened to (M, in), names its
adapter g = row_adapter[m] in [-1, G); -1 takes the base layer alone. For each row m with adapter g:

    M_drop = keep_mask(seed, m * in + col, p_g) / (1 - p_g)     dropout on the adapter's input, p per adapter
    s_m = (M_drop ⊙ x_m) @ A_g^T                                 (r,), zero for base-only rows; saved for backward
    y_m = x_m @ W^T + b + scaling_g * s_m @ B_g^T               (out,)

Backward, with dY (M, out), per row m of adapter g, and per adapter over its rows R_g:

    g_m  = dY_m @ B_g                                            (r,)
    dX_m = dY_m @ W + scaling_g * M_drop ⊙ (g_m @ A_g)           (in,)
    dA_g = scaling_g * sum over m in R_g of g_m^T (M_drop ⊙ x_m)  (r, in)   only its own rows' gradient
    dB_g = scaling_g * sum over m in R_g of dY_m^T s_m            (out, r)
    dW = dY^T @ x,  db = sum over rows of dY                     only when W / b require grad

The kernels (lora_segmented_triton.py) follow punica's SGMV and S-LoRA: the rows are grouped by adapter on the host
with torch ops (`plan_rows`: a stable sort, segment offsets, a tile table; no host sync), and each program of a
row kernel takes BLOCK_M rows of ONE adapter, gathered through the permutation. So a mixed batch costs one launch
per product, as a batch of one adapter does, where a loop over adapters launches G times as many and a per-row
gather (bmm) copies an adapter per row. The forward is `lora.py`'s two launches: s in a skinny kernel (its dropout
mask drawn once per element of x; s is saved for backward anyway), then y in one GEMM whose tiles are seeded with
scaling_g * s @ B_g^T, so the low-rank term never exists as a (tokens x out) tensor. dA and dB are segmented
reductions, a grid of adapters x feature blocks x slices of rows. fp32, fp16 and bf16 accumulate in fp32.
"""

import torch
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.kernels import backend, rng
from tinygraft.kernels.lora import KERNEL_DTYPES

NAME = "segmented_lora_linear"


def _check(x, weight, bias, lora_a, lora_b, scaling, row_adapter, dropout_p):
    if weight.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise TinygraftError(
            f"{NAME} needs a 2-d weight (out, in) and 3-d lora_a (G, r, in) and lora_b (G, out, r); got "
            f"{weight.dim()}-d, {lora_a.dim()}-d and {lora_b.dim()}-d"
        )
    out_f, in_f = weight.shape
    G, r = lora_a.shape[:2]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise TinygraftError(
            f"{NAME} input's last dim is {tuple(x.shape)[-1:]} but the weight is (out, in) = {tuple(weight.shape)}"
        )
    if G == 0 or r == 0 or tuple(lora_a.shape) != (G, r, in_f) or tuple(lora_b.shape) != (G, out_f, r):
        raise TinygraftError(
            f"{NAME} needs lora_a (G, r, {in_f}) and lora_b (G, {out_f}, r) with G, r >= 1; got "
            f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise TinygraftError(f"{NAME} bias must be ({out_f},); got {tuple(bias.shape)}")
    n_scaling = scaling.numel() if isinstance(scaling, torch.Tensor) else len(scaling)
    if n_scaling != G:
        raise TinygraftError(f"{NAME} needs one scaling per adapter ({G}); got {n_scaling}")
    if len(dropout_p) != G or not all(0.0 <= p < 1.0 for p in dropout_p):
        raise TinygraftError(f"{NAME} dropout_p must be None or {G} probabilities in [0, 1); got {dropout_p}")
    M = x.numel() // in_f if in_f else 0
    if not isinstance(row_adapter, torch.Tensor) or row_adapter.dim() != 1 or row_adapter.is_floating_point():
        raise TinygraftError(f"{NAME} row_adapter must be a 1-d integer tensor of the {M} rows' adapter ids")
    if row_adapter.shape[0] != M:
        raise TinygraftError(
            f"{NAME} row_adapter has {row_adapter.shape[0]} entries but x {tuple(x.shape)} holds {M} rows of {in_f}"
        )
    if row_adapter.device != x.device:
        raise TinygraftError(f"{NAME} row_adapter is on {row_adapter.device} but x is on {x.device}")
    if M and not torch.compiler.is_compiling():  # one small host sync; under torch.compile it would break the graph
        lo, hi = torch.stack(torch.aminmax(row_adapter)).tolist()
        if lo < -1 or hi >= G:
            bad = lo if lo < -1 else hi
            raise TinygraftError(
                f"{NAME} row_adapter holds {bad}, outside [-1, {G}) for {G} adapters (-1 = the base layer alone)"
            )


def _check_kernel_dtypes(*tensors):
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or not dtypes <= set(KERNEL_DTYPES):
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise TinygraftError(
            f"{NAME}'s Triton kernel needs x, weight, bias and adapters in one dtype out of float32/float16/bfloat16;"
            f" got {names} (cast them, or run under autocast)"
        )


def _per_adapter_list(values, G) -> list[float]:
    """dropout_p as G floats: None is no dropout, a single number applies to every adapter."""
    if values is None:
        return [0.0] * G
    if isinstance(values, (int, float)):
        return [float(values)] * G
    return [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def _scaling_tensor(scaling, device, dtype=torch.float32) -> torch.Tensor:
    """scaling as a (G,) tensor on x's device (float32 for the kernels; the reference's own dtype, so a float64 check
    is float64 throughout): a constant of the layer, no gradient flows to it."""
    if isinstance(scaling, torch.Tensor):
        return scaling.detach().to(device=device, dtype=dtype).reshape(-1)
    return torch.tensor([float(s) for s in scaling], dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Grouping rows by adapter: torch ops on the device, sized without reading the counts (no host sync).


def tile_rows() -> int:
    """BLOCK_M of the row kernels' tiles: 64 on a GPU (see lora_segmented_triton), 16 under the interpreter, so the
    tests' small batches still span several tiles per adapter."""
    return 16 if backend.interpreting() else 64


def plan_rows(row_adapter: torch.Tensor, num_adapters: int, block_m: int):
    """(order, seg, table), all int32, for M rows with ids in [-1, G):

    order (M,)       sorted position -> original row; the rows of each id are contiguous, in their original order
    seg (G + 2,)     group j (j = 0: the base-only rows, j = g + 1: adapter g) is the positions [seg[j], seg[j + 1])
    table (T, 3)     tile t -> (first position, end position, adapter id or -1); at most block_m rows, one group.
                     T = cdiv(M, block_m) + G bounds sum_j cdiv(count_j, block_m) without reading the counts; the
                     spare tiles at the end are (0, 0, G) and their programs return at once.
    """
    G, M, dev = num_adapters, row_adapter.shape[0], row_adapter.device
    ids, order = torch.sort(row_adapter, stable=True)
    seg = torch.searchsorted(ids, torch.arange(-1, G + 1, device=dev, dtype=ids.dtype))  # (G + 2,), seg[-1] = M
    tiles = (seg[1:] - seg[:-1] + block_m - 1) // block_m  # (G + 1,) tiles per group
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(-(-M // block_m) + G, device=dev)
    group = torch.searchsorted(tile_end, t, right=True)  # the group tile t falls in; G + 1 = a spare tile
    live = group <= G
    group = group.clamp(max=G)
    start = seg[group] + (t - tile_end[group] + tiles[group]) * block_m
    end = torch.minimum(start + block_m, seg[group + 1])
    table = torch.stack([start * live, end * live, group - 1], 1)
    return order.to(torch.int32), seg.to(torch.int32), table.to(torch.int32)


class _Dropout:
    """Per-adapter dropout as the kernels take it: keep-mask thresholds, 1 / (1 - p), and the seed's key."""

    def __init__(self, dropout_p: list[float], seed: int, device):
        self.on = any(p > 0.0 for p in dropout_p)
        self.inv_keep = torch.tensor([1.0 / (1.0 - p) for p in dropout_p], dtype=torch.float32, device=device)
        thresholds = [rng.drop_threshold(p) for p in dropout_p]
        self.threshold = torch.tensor(thresholds, dtype=torch.int32, device=device) if self.on else None
        self.key = rng.seed_key(seed) if self.on else None


# ---------------------------------------------------------------------------------------------------------------
# Custom-op glue: opaque to torch.compile (no graph break), Triton imported only when the op runs.


@torch.library.custom_op("tinygraft::segmented_lora_linear", mutates_args=())
def _segmented_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    order: torch.Tensor,
    seg: torch.Tensor,
    table: torch.Tensor,
    block_m: int,
    dropout_p: list[float],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from tinygraft.kernels import lora_segmented_triton as st

    drop = _Dropout(dropout_p, seed, x.device)
    tiles = (order, table, block_m)
    s = st.seg_skinny(x, lora_a.transpose(1, 2), drop.inv_keep, *tiles, drop.threshold, drop.key)  # (M, r)
    y = st.seg_gemm(x, weight.t(), s, lora_b.transpose(1, 2), scaling, *tiles, bias=bias)
    return y, s


@_segmented_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, order, seg, table, block_m, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[1])


@torch.library.custom_op("tinygraft::segmented_lora_linear_backward", mutates_args=())
def _segmented_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: torch.Tensor,
    order: torch.Tensor,
    seg: torch.Tensor,
    table: torch.Tensor,
    block_m: int,
    dropout_p: list[float],
    seed: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db, dA, dB); a gradient not in `needs` comes back as an empty tensor."""
    from tinygraft.kernels import lora_segmented_triton as st
    from tinygraft.kernels import lora_triton as kt

    need_x, need_w, need_bias, need_a, need_b = needs
    drop = _Dropout(dropout_p, seed, x.device)
    tiles = (order, table, block_m)
    ones = torch.ones_like(scaling)

    def empty():  # a fresh one each time: a custom op's outputs may not alias each other
        return grad_y.new_empty(0)

    g = st.seg_skinny(grad_y, lora_b, ones, *tiles) if need_x or need_a else None  # (M, r), zero on base rows
    dx = empty()
    if need_x:
        dx = st.seg_gemm(grad_y, weight, g, lora_a, scaling * drop.inv_keep, *tiles, None, drop.threshold, drop.key)
    dw = kt.lowrank_matmul(grad_y.t(), x, out_dtype=weight.dtype) if need_w else empty()
    db = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype) if need_bias else empty()
    da = empty()
    if need_a:  # dA_g^T (in, r), written straight into dA's transpose
        da = torch.empty_like(lora_a)
        st.seg_reduce(x, g, scaling * drop.inv_keep, order, seg, da.transpose(1, 2), drop.threshold, drop.key)
    db_lora = st.seg_reduce(grad_y, s, scaling, order, seg, torch.empty_like(lora_b)) if need_b else empty()
    return dx, dw, db, da, db_lora


@_segmented_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, s, scaling, order, seg, table, block_m, dropout_p, seed, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(grad_y.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, order, seg, table, block_m, dropout_p, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], scaling, order, seg, table)
    ctx.block_m, ctx.dropout_p, ctx.seed, ctx.has_bias = block_m, dropout_p, seed, bias is not None


def _backward(ctx, grad_y, _grad_s):
    x, weight, lora_a, lora_b, s, scaling, order, seg, table = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
    grads = torch.ops.tinygraft.segmented_lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, s, scaling, order, seg, table, ctx.block_m, ctx.dropout_p, ctx.seed, needs
    )
    dx, dw, db, da, db_lora = (grad if wanted else None for grad, wanted in zip(grads, needs))
    return dx, dw, db, da, db_lora, *([None] * 7)


_segmented_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# The public function.


def segmented_lora_linear(x, weight, bias, lora_a, lora_b, scaling, row_adapter, dropout_p=None, seed=None):
    """y_m = x_m @ W^T + b + scaling[g] * (drop_g(x_m) @ A_g^T) @ B_g^T, g = row_adapter[m] (-1: the base alone).

    x (..., in), W (out, in), bias (out,) or None, lora_a (G, r, in), lora_b (G, out, r), scaling G floats (a
    tensor or a sequence), row_adapter (M,) integers for the M = x.numel() // in rows of x flattened to (M, in),
    dropout_p None or G probabilities (one number: the same for every adapter). With dropout the mask is a function
    of `seed` (drawn from torch's RNG when None) and the element's index row * in + col in the flattened x, as in
    `lora_linear`; `segmented_lora_linear_reference` reproduces it bit for bit. Under autocast x, W, b, A and B are
    cast to the dtype autocast gives a matmul.
    """
    dropout = _per_adapter_list(dropout_p, lora_a.shape[0] if lora_a.dim() == 3 else 0)
    _check(x, weight, bias, lora_a, lora_b, scaling, row_adapter, dropout)
    scaling = _scaling_tensor(scaling, x.device, torch.promote_types(x.dtype, torch.float32))
    cast_to = backend.autocast_dtype(x.device.type)
    if cast_to is not None:
        x, weight, lora_a, lora_b = (t.to(cast_to) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(cast_to) if bias is not None else None
    if any(dropout) and seed is None:
        seed = rng.new_seed()
    if backend.backend_for(x, weight, bias, lora_a, lora_b) == "reference":
        return segmented_lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, row_adapter, dropout, seed)
    _check_kernel_dtypes(x, weight, bias, lora_a, lora_b)
    scaling = scaling.float()
    block_m = tile_rows()
    order, seg, table = plan_rows(row_adapter, lora_a.shape[0], block_m)
    y, _ = torch.ops.tinygraft.segmented_lora_linear(
        x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, order, seg, table, block_m, dropout,
        rng.kernel_seed(int(seed)) if any(dropout) else 0,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# The reference: plain differentiable PyTorch, the definition of the right answer (run it in float64 to check).


def segmented_dropout_keep(seed: int, dropout_p, row_adapter: torch.Tensor, in_features: int) -> torch.Tensor:
    """The keep-mask (M, in) the kernels draw: row m uses its adapter's p at index m * in + col, the very bits
    `rng.keep_mask_like` (and so `lora_linear`) gives that p; base-only rows and p = 0 keep everything."""
    M = row_adapter.shape[0]
    row_adapter = row_adapter.long()
    dropout_p = [float(p) for p in dropout_p]
    p_row = torch.tensor([*dropout_p, 0.0], dtype=torch.float64, device=row_adapter.device)[row_adapter]  # -1 -> 0
    keep = torch.ones(M, in_features, dtype=torch.bool, device=row_adapter.device)
    for p in sorted(set(dropout_p) - {0.0}):  # one mask per distinct p (usually one), not one per adapter
        keep = torch.where((p_row == p)[:, None], rng.keep_mask_like(seed, (M, in_features), p, row_adapter.device),
                           keep)  # fmt: skip
    return keep


def segmented_lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, row_adapter, dropout_p=None, seed=None):
    """Every adapter's low-rank product on every row, kept where a one-hot of the row's adapter says: G times the
    LoRA FLOPs, but dense matmuls with no per-row copies of A or B, and exactly the per-row math in float64."""
    G, r, in_f = lora_a.shape
    out_f = weight.shape[0]
    lead = x.shape[:-1]
    x = x.reshape(-1, in_f)
    M = x.shape[0]
    y = F.linear(x, weight, bias)
    dropout = _per_adapter_list(dropout_p, G)
    if any(dropout):
        keep = segmented_dropout_keep(seed, dropout, row_adapter, in_f)
        keep_frac = torch.tensor([1.0 - p for p in dropout] + [1.0], dtype=x.dtype, device=x.device)
        x = x * keep.to(x.dtype) / keep_frac[row_adapter.long()][:, None]
    used = row_adapter >= 0
    ids = row_adapter.long().clamp(min=0)
    scale = _scaling_tensor(scaling, x.device, torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
    onehot = F.one_hot(ids, G).to(x.dtype) * (scale[ids] * used)[:, None]  # (M, G): the row's scaling at its adapter
    s = F.linear(x, lora_a.reshape(G * r, in_f)).view(M, G, r) * onehot[:, :, None]  # (M, G, r)
    y = y + F.linear(s.reshape(M, G * r), lora_b.permute(1, 0, 2).reshape(out_f, G * r))
    return y.reshape(*lead, out_f)
