"""segmented_lora_linear: the Triton path (interpreter on CPU, compiled on a GPU) against a float64 reference, and
the reference against a per-row loop of plain F.linear.

Tolerance rule (tests/kernels/tolerance.py): the kernel's max error against float64 is at most twice PyTorch's own
error (the reference run in the input dtype), floored at the rounding error of the output's reduction, plus one ulp
of the output's scale.
"""

import pytest
import torch
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.kernels import rng
from tinygraft.kernels.lora import lora_linear_reference
from tinygraft.kernels.lora_segmented import (
    plan_rows,
    segmented_dropout_keep,
    segmented_lora_linear,
    segmented_lora_linear_reference,
)

from .tolerance import assert_rule as assert_tolerance

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
SEED = 1234


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")


def make_inputs(shape, in_f, out_f, G, r, bias, dtype, device, weight_grad=False):
    """Fresh random x, W (out, in), bias, A (G, r, in), B (G, out, r): every one nonzero (B too, unlike at init)."""
    x = torch.randn(*shape, in_f, device=device)
    w = torch.randn(out_f, in_f, device=device) / in_f**0.5
    b = torch.randn(out_f, device=device) if bias else None
    a = torch.randn(G, r, in_f, device=device) / in_f**0.5
    lb = torch.randn(G, out_f, r, device=device) / r**0.5
    grads = [True, weight_grad, weight_grad, True, True]
    return [None if t is None else t.to(dtype).requires_grad_(g) for t, g in zip([x, w, b, a, lb], grads)]


def scalings(G):
    return [0.5 + 0.75 * g for g in range(G)]  # a different scaling per adapter


def leaves(inputs, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs]


def run(fn, inputs, scaling, ids, dropout, grad_out):
    """Output and the gradient of every input that requires one."""
    y = fn(*inputs, scaling, ids, dropout, SEED)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, wanted, grad_out)


def assert_rule(what, got, ref64, ref_same_dtype, k):
    atol = torch.finfo(got.dtype).eps * ref64.abs().max().item()
    assert_tolerance(what, got, ref_same_dtype, ref64, got.dtype, k, atol=atol)


def check_against_reference(inputs, ids, dropout):
    x, w, _, a, _ = inputs
    dtype, G, r = x.dtype, a.shape[0], a.shape[1]
    M, out_f, in_f = ids.numel(), w.shape[0], w.shape[1]
    scaling = scalings(G)
    grad_out = torch.randn(*x.shape[:-1], out_f, device=x.device, dtype=dtype)
    y, grads = run(segmented_lora_linear, inputs, scaling, ids, dropout, grad_out)
    y64, grads64 = run(segmented_lora_linear_reference, leaves(inputs, torch.float64), scaling, ids, dropout,
                       grad_out.double())  # fmt: skip
    y_t, grads_t = run(segmented_lora_linear_reference, leaves(inputs, dtype), scaling, ids, dropout, grad_out)
    # The summation length behind each output (x -> s -> y sums over in, then over r; and so on).
    k = {"y": in_f + r, "dx": out_f + r, "dW": M, "db": M, "dA": out_f + M, "dB": M + in_f}
    assert y.dtype == dtype and y.shape == y64.shape
    assert_rule("y", y, y64, y_t, k["y"])
    names = [n for n, t in zip(["dx", "dW", "db", "dA", "dB"], inputs) if t is not None and t.requires_grad]
    for name, g, g64, g_t in zip(names, grads, grads64, grads_t):
        assert g.dtype == dtype and g.shape == g64.shape, name
        assert_rule(name, g, g64, g_t, k[name])


def row_ids(kind, M, G, device):
    if kind == "one":  # every row the same adapter
        return torch.full((M,), G - 1, dtype=torch.int64, device=device)
    if kind == "distinct":  # every row its own adapter (M = G + 1: one of them the base alone)
        return torch.randperm(M, device=device) - 1
    return torch.randint(-1, G, (M,), device=device)  # "mixed": some rows -1


# Every awkward value appears at least once: M 1/7/129, in and out off the blocks (24, 40, 33), r 1/4/8 (padded to a
# 16-wide tile), G 1/3/5, each dtype, bias on/off, dropout on/off with a different p per adapter, dW and db through
# the kernel in some cases.
CASES = [
    dict(shape=(1,), in_f=24, out_f=40, G=3, r=4, rows="mixed", bias=True, dtype=FP32, p=None, wg=False),
    dict(shape=(129,), in_f=33, out_f=24, G=3, r=8, rows="one", bias=False, dtype=FP16, p=[0.1, 0.0, 0.25], wg=False),
    dict(shape=(6,), in_f=40, out_f=33, G=5, r=1, rows="distinct", bias=True, dtype=BF16,
         p=[0.2, 0.0, 0.3, 0.1, 0.5], wg=True),
    dict(shape=(129,), in_f=24, out_f=40, G=5, r=4, rows="mixed", bias=True, dtype=FP32,
         p=[0.1, 0.25, 0.0, 0.5, 0.3], wg=True),
    dict(shape=(7,), in_f=40, out_f=24, G=1, r=8, rows="mixed", bias=True, dtype=FP16, p=[0.25], wg=True),
    dict(shape=(129,), in_f=40, out_f=33, G=3, r=8, rows="mixed", bias=False, dtype=BF16, p=[0.3, 0.1, 0.2], wg=False),
    dict(shape=(2, 3, 5), in_f=33, out_f=40, G=3, r=1, rows="mixed", bias=True, dtype=FP32, p=None, wg=True),
]  # fmt: skip


def _name(c):
    dt = str(c["dtype"]).removeprefix("torch.")
    M = torch.Size(c["shape"]).numel()
    return f"M{M}-{c['in_f']}x{c['out_f']}-G{c['G']}-r{c['r']}-{c['rows']}-b{int(c['bias'])}-p{int(bool(c['p']))}-{dt}"


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_forward_and_every_gradient(case, device):
    inputs = make_inputs(case["shape"], case["in_f"], case["out_f"], case["G"], case["r"], case["bias"],
                         case["dtype"], device, case["wg"])  # fmt: skip
    M = torch.Size(case["shape"]).numel()
    check_against_reference(inputs, row_ids(case["rows"], M, case["G"], device), case["p"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_larger_shapes_and_two_rank_tiles(dtype, device):
    """Several tiles per adapter, many column blocks, r = 130 (two 128-wide rank tiles)."""
    inputs = make_inputs((300,), 72, 97, 4, 130, True, dtype, device, weight_grad=True)
    check_against_reference(inputs, row_ids("mixed", 300, 4, device), [0.1, 0.2, 0.0, 0.3])


def test_reference_is_a_per_row_loop_of_plain_linears():
    """The reference (one-hot over adapters) against row-by-row F.linear, float64, with dropout: values and
    every gradient, so the reference really is the definition of the right answer."""
    G, M, in_f, out_f, r = 3, 11, 12, 10, 4
    inputs = make_inputs((M,), in_f, out_f, G, r, True, torch.float64, torch.device("cpu"), weight_grad=True)
    ids = torch.tensor([2, -1, 0, 0, 1, 2, -1, 1, 0, 2, 2])
    scaling, dropout = scalings(G), [0.5, 0.25, 0.0]

    def loop(x, w, b, a, lb, scaling, ids, dropout, seed):
        out = []
        for m in range(M):
            y = F.linear(x[m], w, b)
            g = int(ids[m])
            if g >= 0:
                keep = rng.keep_mask_like(seed, (M, in_f), dropout[g])[m] if dropout[g] else torch.ones(in_f)
                xd = x[m] * keep.double() / (1.0 - dropout[g])
                y = y + scaling[g] * F.linear(F.linear(xd, a[g]), lb[g])
            out.append(y)
        return torch.stack(out)

    grad_out = torch.randn(M, out_f, dtype=torch.float64)
    y, grads = run(segmented_lora_linear_reference, inputs, scaling, ids, dropout, grad_out)
    y_loop, grads_loop = run(loop, leaves(inputs, torch.float64), scaling, ids, dropout, grad_out)
    torch.testing.assert_close(y, y_loop, rtol=1e-12, atol=1e-12)
    for g, g_loop in zip(grads, grads_loop):
        torch.testing.assert_close(g, g_loop, rtol=1e-12, atol=1e-12)
    da = grads[3]
    assert all(da[g].abs().sum() > 0 for g in range(G))  # each adapter got its own rows' gradient


def test_padded_ranks_match_lora_linear_per_adapter(device):
    """Adapters of ranks 1, 4 and 3 stacked and zero-padded to r = 4 give each adapter's own lora_linear on its
    rows, dropout mask included (the same index convention: row * in + col of the whole batch)."""
    ranks, in_f, out_f, M = [1, 4, 3], 24, 40, 33
    x, w, b, a, lb = (t.detach() for t in make_inputs((M,), in_f, out_f, 3, 4, True, FP32, device))
    for g, rank in enumerate(ranks):  # the padding: zero rows of A_g, zero columns of B_g
        a[g, rank:] = 0.0
        lb[g, :, rank:] = 0.0
    ids = row_ids("mixed", M, 3, device)
    scaling, dropout = scalings(3), [0.25, 0.1, 0.0]
    y = segmented_lora_linear(x, w, b, a, lb, scaling, ids, dropout, SEED)
    ref64, ref32 = torch.empty(M, out_f, dtype=torch.float64, device=device), torch.empty_like(y)
    ref64[ids == -1] = F.linear(x.double(), w.double(), b.double())[ids == -1]
    ref32[ids == -1] = F.linear(x, w, b)[ids == -1]
    for g, rank in enumerate(ranks):
        args = (a[g, :rank], lb[g, :, :rank], scaling[g], dropout[g], SEED)
        ref64[ids == g] = lora_linear_reference(x.double(), w.double(), b.double(), *(t.double() for t in args[:2]),
                                                *args[2:])[ids == g]  # fmt: skip
        ref32[ids == g] = lora_linear_reference(x, w, b, *args)[ids == g]
    assert_rule("y", y, ref64, ref32, in_f + 4)


def test_dropout_mask_is_the_shared_counter_hash(device):
    """The kernel drops exactly the elements rng.keep_mask_like names for each row's adapter's p."""
    G, M, n = 2, 9, 16
    x = torch.randn(M, n, device=device)
    eye = torch.eye(n, device=device).expand(G, n, n).contiguous()  # A = B = I, W = 0: y = s_g * mask * x / (1-p)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1], device=device)
    dropout, scaling = [0.5, 0.25], [1.0, 3.0]
    y = segmented_lora_linear(x, torch.zeros(n, n, device=device), None, eye, eye, scaling, ids, dropout, seed=99)
    keep = segmented_dropout_keep(99, dropout, ids, n)
    for g, p in enumerate(dropout):
        assert torch.equal(keep[ids == g], rng.keep_mask_like(99, (M, n), p, device)[ids == g])
    assert keep[ids == -1].all() and 0 < keep.sum() < keep.numel()
    factor = torch.tensor([s / (1 - p) for s, p in zip(scaling, dropout)] + [0.0], device=device)[ids]
    torch.testing.assert_close(y, torch.where(keep, x * factor[:, None], torch.zeros_like(x)))
    torch.manual_seed(3)
    y1 = segmented_lora_linear(x, torch.zeros(n, n, device=device), None, eye, eye, scaling, ids, dropout)
    torch.manual_seed(3)
    y2 = segmented_lora_linear(x, torch.zeros(n, n, device=device), None, eye, eye, scaling, ids, dropout)
    assert torch.equal(y1, y2)  # no seed given: drawn from torch's RNG


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_tile_table_covers_every_row_once_one_adapter_per_tile(block_m):
    G, M = 5, 57
    ids = torch.randint(-1, G, (M,))
    ids[ids == 2] = 3  # an adapter with no rows
    order, seg, table = plan_rows(ids, G, block_m)
    assert torch.equal(ids[order.long()], ids.sort(stable=True).values)
    assert seg.tolist() == [0, *torch.cumsum(torch.bincount(ids + 1, minlength=G + 1), 0).tolist()]
    seen = torch.zeros(M, dtype=torch.int64)
    for start, end, adapter in table.tolist():
        assert 0 <= end - start <= block_m
        if end > start:
            seen[start:end] += 1
            assert (ids[order[start:end].long()] == adapter).all()
    assert (seen == 1).all()


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_autocast_casts_like_a_matmul(dtype, device):
    inputs = make_inputs((7,), 24, 40, 3, 4, True, FP32, device)
    ids, dropout, scaling = row_ids("mixed", 7, 3, device), [0.25, 0.1, 0.0], scalings(3)
    grad_out = torch.randn(7, 40, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y, grads = run(segmented_lora_linear, inputs, scaling, ids, dropout, grad_out.to(dtype))
        expected = F.linear(inputs[0], inputs[1])
    assert y.dtype == expected.dtype == dtype
    assert all(g.dtype == FP32 for g in grads)  # gradients arrive in the leaves' dtype
    cast = leaves(inputs, dtype)
    y_ref, grads_ref = run(segmented_lora_linear_reference, cast, scaling, ids, dropout, grad_out.to(dtype))
    y64, grads64 = run(segmented_lora_linear_reference, leaves(cast, torch.float64), scaling, ids, dropout,
                       grad_out.to(dtype).double())  # fmt: skip
    assert_rule("y", y, y64, y_ref, 24 + 4)
    for name, g, g64, g_ref, k in zip(["dx", "dA", "dB"], grads, grads64, grads_ref, [44, 47, 31]):
        assert_rule(name, g.to(dtype), g64, g_ref, k)


def test_compiled_keeps_the_op_in_one_graph(device):
    """fullgraph=True: the grouping (torch ops) traces, the kernel stays one opaque op, values match eager."""
    from torch._dynamo.backends.debugging import aot_eager  # noqa: PLC0415 (dynamo loads only here)

    x, w, b, a, lb = make_inputs((7,), 24, 40, 3, 4, True, FP32, device)
    ids, scaling = row_ids("mixed", 7, 3, device), torch.tensor(scalings(3), device=device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    fn = torch.compile(segmented_lora_linear, fullgraph=True, backend=backend)
    y = fn(x, w, b, a, lb, scaling, ids)
    ops = (torch.ops.tinygraft.segmented_lora_linear, torch.ops.tinygraft.segmented_lora_linear.default)
    assert sum(node.target in ops for node in graphs[0].graph.nodes) == 1
    grads = torch.autograd.grad(y.square().sum(), [x, a, lb])
    y_eager = segmented_lora_linear(x, w, b, a, lb, scaling, ids)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, a, lb])
    torch.testing.assert_close(y, y_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)
    torch._dynamo.reset()


def test_bad_inputs_raise_one_sentence(device):
    x, w, b, a, lb = (t.detach() for t in make_inputs((5,), 16, 8, 3, 4, True, FP32, device))
    ids, s = torch.tensor([0, 1, -1, 2, 0], device=device), [1.0, 2.0, 3.0]
    bad = [
        ("last dim", dict(x=x[:, :15])),
        ("lora_a", dict(a=a[:, :, :15])),
        ("lora_a", dict(lb=lb[:2])),
        ("3-d lora_a", dict(a=a[0])),
        ("bias", dict(b=b[:3])),
        ("one scaling per adapter", dict(s=[1.0])),
        ("dropout_p", dict(p=[0.1, 1.0, 0.0])),
        ("dropout_p", dict(p=[0.1])),
        ("has 4 entries", dict(ids=ids[:4])),
        ("holds 3, outside", dict(ids=torch.tensor([0, 1, 3, 2, 0], device=device))),
        ("holds -2, outside", dict(ids=torch.tensor([0, -2, 1, 2, 0], device=device))),
        ("integer tensor", dict(ids=ids.float())),
        ("one dtype", dict(w=w.half())),
    ]
    for says, change in bad:
        args = dict(x=x, w=w, b=b, a=a, lb=lb, s=s, ids=ids, p=None) | change
        with pytest.raises(TinygraftError, match=says) as info:
            segmented_lora_linear(args["x"], args["w"], args["b"], args["a"], args["lb"], args["s"], args["ids"],
                                  args["p"])  # fmt: skip
        assert "\n" not in str(info.value), says


@pytest.mark.kernel_smoke
def test_kernel_smoke(device):
    """One quick case through every kernel: fp16, bias, per-adapter dropout, base-only rows, all five gradients."""
    inputs = make_inputs((7,), 24, 40, 3, 4, True, FP16, device, weight_grad=True)
    check_against_reference(inputs, torch.tensor([2, -1, 0, 2, 1, -1, 0], device=device), [0.25, 0.0, 0.1])
