"""Triton kernels and launchers for FusedAdamW (math in adamw.py; imported only when a Triton path runs).

Multi-tensor layout: one launch covers every tensor of a (device, dtype) group through three small device tables
rebuilt each step (the grads are new tensors each step when zero_grad sets them to None):
    addrs  (K, 5) int64    data_ptr of param, grad, exp_avg, exp_avg_sq, fp32 master weights (0 without)
    hyper  (K, 9) fp32     per-tensor scalars, the columns HYPER names (bias corrections differ per tensor: a tensor
                           skipped for lack of a grad keeps its own step count)
    blocks (B, 2) int64    (tensor index, block index within the tensor): program b updates one BLOCK of one tensor
A program turns its addresses into typed pointers (`tl.load(...).to(tl.pointer_type(...))`): no flat buffer the
params must live in, no copy of the grads. Full blocks take an unmasked path (with 16-byte alignment hints when
every address allows, so a GPU issues 128-bit loads); only a tensor's last block is masked.
"""

import torch
import triton
import triton.language as tl

from tinygraft.kernels.backend import interpreting

ADDR_COLS = 5
HYPER = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps", "sign")
HYPER_COLS = len(HYPER)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. bf16 by integer arithmetic, as torch rounds: the interpreter's own
    fp32 -> bf16 cast truncates (and its rtne mode loses the carry into the exponent); a GPU gets the same bits."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, n,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, gscale,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MASTER: tl.constexpr, COMPUTE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    mask = (offs < n) if MASKED else None
    if MASTER:  # fp32 master weights replace the param as the value updated
        p = tl.load(w_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE) * gscale  # gscale = +-1 (maximize) x clip coefficient
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
    # torch.optim.AdamW's order of operations, IEEE sqrt and division as on its CPU/CUDA paths
    m = m + one_minus_beta1 * (g - m)  # exp_avg.lerp_(g, 1 - beta1)
    v = v * beta2 + one_minus_beta2 * g * g  # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
    if COMPUTE == tl.float64:  # sqrt_rn/div_rn take fp32 only; fp64 sqrt and division are IEEE-rounded already
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p * decay - step_size * (m / denom)
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p * decay - step_size * tl.div_rn(m, denom)  # decoupled decay, then the bias-corrected step
    tl.store(m_ptr + offs, _round(m, S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, _round(v, S_DTYPE), mask=mask)
    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, _round(p, P_DTYPE), mask=mask)


@triton.jit
def _adamw_kernel(
    addrs_ptr, numels_ptr, hyper_ptr, blocks_ptr, clip_ptr,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MASTER: tl.constexpr, HAS_CLIP: tl.constexpr,
    COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1) * BLOCK  # a multiple of BLOCK the compiler can see
    n = tl.load(numels_ptr + t)
    row = addrs_ptr + t * 5  # param, grad, exp_avg, exp_avg_sq, master
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(S_DTYPE))
    w_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every address 16-byte aligned (checked on the host): 128-bit loads and stores
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
    hy = hyper_ptr + t * 9  # the columns of HYPER, in order
    decay, beta1, one_minus_beta1 = tl.load(hy), tl.load(hy + 1), tl.load(hy + 2)
    beta2, one_minus_beta2, step_size = tl.load(hy + 3), tl.load(hy + 4), tl.load(hy + 5)
    bc2_sqrt, eps, gscale = tl.load(hy + 6), tl.load(hy + 7), tl.load(hy + 8)
    if HAS_CLIP:
        gscale = gscale * tl.load(clip_ptr)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # a full block: no mask, so the loads can vectorize
        _adamw_block(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            w_ptr,
            offs,
            n,
            decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            step_size,
            bc2_sqrt,
            eps,
            gscale,
            P_DTYPE,
            S_DTYPE,
            MASTER,
            COMPUTE,
            False,
        )
    else:  # the tensor's last, partial block
        _adamw_block(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            w_ptr,
            offs,
            n,
            decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            step_size,
            bc2_sqrt,
            eps,
            gscale,
            P_DTYPE,
            S_DTYPE,
            MASTER,
            COMPUTE,
            True,
        )


@triton.jit
def _sq_norm_kernel(
    addrs_ptr, numels_ptr, blocks_ptr, out_ptr, P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """out[b] = sum of grad^2 over block b (fp32): the per-block partials of the global grad norm."""
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1) * BLOCK
    n = tl.load(numels_ptr + t)
    g_ptr = tl.load(addrs_ptr + t * 5 + 1).to(tl.pointer_type(P_DTYPE))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(g * g, axis=0))


# ---- launchers ----

# Fixed, not autotuned: autotuning an in-place update would apply it once per config tried. 4096 elements over
# 8 warps = 16 per thread (four 128-bit fp32 loads per tensor). Small under the interpreter (it runs numpy per block).
BLOCK = 1024 if interpreting() else 4096
NUM_WARPS = 8

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


_blocks_cache: dict = {}


def _block_table(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, 2) int64 rows (tensor index, block index within it); cached: the set of shapes rarely changes."""
    key = (numels, device)
    if key not in _blocks_cache:
        if len(_blocks_cache) > 16:
            _blocks_cache.clear()
        counts = (torch.tensor(numels, dtype=torch.int64) + BLOCK - 1) // BLOCK
        tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        within = torch.arange(tensor_idx.numel()) - first
        _blocks_cache[key] = torch.stack([tensor_idx, within], dim=1).to(device)
    return _blocks_cache[key]


class Group:
    """The device tables of one launch, rebuilt each step from rows (param, grad, exp_avg, exp_avg_sq, master|None).

    `hyper` is the (K, 9) table of per-tensor scalars, fp32 (fp64 for fp64 params), on any device.
    """

    def __init__(self, rows: list[tuple], hyper: torch.Tensor, device: torch.device):
        addrs = [x.data_ptr() if x is not None else 0 for row in rows for x in row]
        numels = tuple(row[0].numel() for row in rows)
        pin = device.type == "cuda"  # pinned + non_blocking: the copy need not wait for the stream to drain
        table = torch.tensor(addrs + list(numels), dtype=torch.int64)
        table = (table.pin_memory() if pin else table).to(device, non_blocking=pin)
        self.addrs, self.numels = table[: len(addrs)], table[len(addrs) :]
        self.hyper = (hyper.pin_memory() if pin and hyper.device.type == "cpu" else hyper).to(device, non_blocking=pin)
        self.blocks = _block_table(numels, device)
        self.n_blocks = self.blocks.shape[0]
        self.aligned = all(a % 16 == 0 for a in addrs)
        self.device = device


def launch_update(group: Group, p_dtype, s_dtype, master: bool, clip_coef: torch.Tensor | None) -> None:
    """One launch: the AdamW update of every tensor of the group, in place."""
    compute = tl.float64 if p_dtype == torch.float64 else tl.float32
    clip = clip_coef if clip_coef is not None else group.hyper  # any pointer; unread without HAS_CLIP
    _adamw_kernel[(group.n_blocks,)](
        group.addrs, group.numels, group.hyper, group.blocks, clip,
        P_DTYPE=_TL[p_dtype], S_DTYPE=_TL[s_dtype], MASTER=master, HAS_CLIP=clip_coef is not None,
        COMPUTE=compute, ALIGNED=group.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip


def grad_sq_norm(group: Group, p_dtype) -> torch.Tensor:
    """Sum of squares of every grad of the group (fp32 0-d tensor on the device; partials summed by torch)."""
    partials = torch.empty(group.n_blocks, dtype=torch.float32, device=group.device)
    _sq_norm_kernel[(group.n_blocks,)](
        group.addrs,
        group.numels,
        group.blocks,
        partials,
        P_DTYPE=_TL[p_dtype],
        ALIGNED=group.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return partials.sum()
