"""kd_loss's Triton path (kernels/kd_loss_triton.py: the interpreter on a CPU, compiled on a GPU) against its PyTorch
path and float64: each divergence, temperatures 1 and 2.5, vocabularies that end mid-tile, ignored rows, the loss
and the gradients to the student's hidden states and head weight.

Tolerance rule (tests/kernels/tolerance.py): the Triton path's error against float64 is at most twice PyTorch's own
in the same dtype (the PyTorch path for fp32, an eager bf16 head for bf16), floored at the rounding error of the
output's reduction, plus one ulp of the output's scale.
"""

import pytest
import torch

from tinygraft.kernels import kd_loss as kd
from tinygraft.kernels.kd_loss import kd_divergence, kd_loss

from .tolerance import assert_rule as assert_tolerance

kt = pytest.importorskip("tinygraft.kernels.kd_loss_triton", reason="the Triton path needs Triton")

F64, FP32, BF16 = torch.float64, torch.float32, torch.bfloat16


def inputs(N, V, device, dtype=FP32, Cs=12, Ct=20):
    """Student h (N, Cs), W (V, Cs), teacher h (N, Ct), W (V, Ct), and labels with every third row ignored."""
    make = lambda *s: (torch.randn(*s, device=device) * 0.7).to(dtype)  # noqa: E731
    labels = torch.randint(0, V, (N,), device=device)
    labels[::3] = -100
    return make(N, Cs), make(V, Cs), make(N, Ct), make(V, Ct), labels


def run(monkeypatch, which, h_s, w_s, h_t, w_t, labels, T, divergence, beta, chunk, dtype=None):
    """(loss, dh_s, dW_s) from kd_loss on the `which` backend, inputs cast to `dtype` first."""
    monkeypatch.setenv("TINYGRAFT_BACKEND", which)
    dtype = dtype or h_s.dtype
    hs, ws = (t.detach().to(dtype).requires_grad_() for t in (h_s, w_s))
    loss = kd_loss(hs, ws, h_t.to(dtype), w_t.to(dtype), labels, T, divergence, beta, chunk=chunk)
    return (loss, *torch.autograd.grad(loss, (hs, ws)))


@pytest.fixture
def launches(monkeypatch):
    """How many chunks reached the kernel (so a silent fall-back to the PyTorch path fails the test)."""
    count = []
    real = kt.kd_rows
    monkeypatch.setattr(kt, "kd_rows", lambda *a: count.append(1) or real(*a))
    return count


def assert_rule(name, ours, theirs, ref64, k):
    atol = torch.finfo(ours.dtype).eps * ref64.abs().max().item()
    assert_tolerance(name, ours, theirs, ref64, ours.dtype, k, atol=atol)


DIVERGENCES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)]
# Pairwise: rows 1, 7, 129 (129 over three chunks, the last of one row), vocabularies ending mid-tile at BLOCK_V 32
# and 64, each temperature with each divergence.
SHAPES = [(1, 33, 1.0, 32, 4), (7, 257, 2.5, 64, 3), (129, 50, 2.5, 32, 64), (7, 50, 1.0, 64, 7)]


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("N,V,T,block_v,chunk", SHAPES)
def test_fp32_loss_and_gradients_against_torch_and_float64(monkeypatch, launches, device, divergence, beta, N, V, T,
                                                           block_v, chunk):  # fmt: skip
    monkeypatch.setitem(kt._INTERPRETER, "BLOCK_V", block_v)
    h_s, w_s, h_t, w_t, labels = inputs(N, V, device)
    if N == 1:
        labels[0] = 0  # the one row kept (every third row is ignored otherwise)
    args = (h_s, w_s, h_t, w_t, labels, T, divergence, beta, chunk)
    ours = run(monkeypatch, "triton", *args)
    theirs = run(monkeypatch, "reference", *args)
    ref = run(monkeypatch, "reference", *args, dtype=F64)
    assert launches, "the Triton path did not run"
    R = int((labels != -100).sum())
    for name, o, t, r, k in zip(("loss", "dh_s", "dW_s"), ours, theirs, ref, (V + R, 2 * V, V + R)):
        assert o.dtype == FP32 and o.shape == r.shape
        assert_rule(name, o, t, r, k)
    assert ours[1][labels == -100].abs().max() == 0 if (labels == -100).any() else True  # ignored rows: no gradient


def test_bf16_heads_against_an_eager_bf16_head_and_float64(monkeypatch, launches, device):
    """bf16 hidden states and weights: bf16 logits and gradient blocks (the kernel computes in fp32), against the
    loss an eager bf16 head gives (both models' logits whole, the KD loss of kd_divergence, autograd back)."""
    h_s, w_s, h_t, w_t, labels = inputs(7, 50, device, dtype=BF16)
    T, divergence, beta = 2.5, "jsd", 0.5
    ours = run(monkeypatch, "triton", h_s, w_s, h_t, w_t, labels, T, divergence, beta, 4)
    assert launches and ours[1].dtype == BF16 and ours[2].dtype == BF16
    hs, ws = (t.detach().requires_grad_() for t in (h_s, w_s))
    eager = kd_divergence(hs @ ws.t(), h_t @ w_t.t(), T, divergence, beta, mask=labels != -100)
    theirs = (eager, *torch.autograd.grad(eager, (hs, ws)))
    ref = run(monkeypatch, "reference", h_s, w_s, h_t, w_t, labels, T, divergence, beta, 4, dtype=F64)
    for name, o, t, r, k in zip(("loss", "dh_s", "dW_s"), ours, theirs, ref, (50 + 7, 100, 57)):
        assert_tolerance(name, o, t, r, BF16, k, atol=torch.finfo(BF16).eps * r.abs().max().item())


def test_all_rows_ignored_is_zero_with_zero_gradients(monkeypatch, device):
    h_s, w_s, h_t, w_t, labels = inputs(5, 40, device)
    loss, gh, gw = run(monkeypatch, "triton", h_s, w_s, h_t, w_t, torch.full_like(labels, -100), 2.0, "jsd", 0.5, 2)
    assert loss == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


@pytest.mark.kernel_smoke
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_kernel_rows_against_float64(device, dtype):
    """The kernel alone on one chunk, every divergence, a third of the rows ignored, and the chunk with none kept: D
    per row (0 where ignored) and the gradient written over the logits (zero rows where ignored). PyTorch's own is
    the same formula in fp32 (the kernel's arithmetic) on the same logits, its gradient stored in their dtype."""
    rows, V, T = 7, 50, 2.5
    s, t = ((torch.randn(rows, V, device=device) * 3).to(dtype) for _ in range(2))
    keep = torch.arange(rows, device=device) % 3 != 0
    scale = torch.tensor(T * T / int(keep.sum()), device=device)
    for divergence, beta in DIVERGENCES:
        d_ref, g_ref = _rows_by_torch(s, t, keep, scale, T, divergence, beta, F64)
        d_torch, g_torch = _rows_by_torch(s, t, keep, scale, T, divergence, beta, FP32)
        g = s.clone()
        d = kt.kd_rows(g, t, keep, scale, T, divergence, beta)
        assert d.dtype == FP32 and g.dtype == dtype
        assert_tolerance(f"{divergence} D", d, d_torch, d_ref, FP32, V, atol=1.2e-7 * d_ref.abs().max().item())
        assert_rule(f"{divergence} grad", g, g_torch.to(dtype), g_ref, V)
        assert (d[~keep] == 0).all() and (g[~keep] == 0).all()
        none = s.clone()
        assert (kt.kd_rows(none, t, torch.zeros_like(keep), scale, T, divergence, beta) == 0).all()
        assert (none == 0).all()


def _rows_by_torch(s, t, keep, scale, T, divergence, beta, dtype):
    log_q, log_p = (torch.log_softmax(x.to(dtype) / T, -1) for x in (s, t))
    d, du = kd._rows(divergence, log_q, log_p, beta)
    return d * keep, du * (keep[:, None] * scale.to(dtype) / T)


def test_the_custom_op_declares_its_mutation_and_fake(device, monkeypatch):
    """torch.library.opcheck: the schema (the logits are mutated), the fake tensor, and AOT dispatch."""
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")
    s, t = torch.randn(5, 40, device=device), torch.randn(5, 40, device=device)
    keep = torch.tensor([True, False, True, True, False], device=device)
    torch.library.opcheck(kd._kd_rows_op, (s, t, keep, torch.tensor(2.0, device=device), 2.0, "jsd", 0.3))
