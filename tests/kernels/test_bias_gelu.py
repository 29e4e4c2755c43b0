"""bias_gelu: the Triton kernel (interpreter on CPU, compiled on a GPU) against a float64 reference.

Tolerance rule (tests/kernels/tolerance.py): the kernel's max error against float64 is at most twice the error of
PyTorch's own op (`gelu(x + b)` run in the same dtype) against float64, floored at the rounding error of the bias
gradient's sum over the rows, plus an atol of two ulps at 1.0 for ties and tiny shapes where PyTorch happens to be
exact.
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from tinygraft.errors import TinygraftError
from tinygraft.kernels.bias_gelu import bias_gelu, bias_gelu_reference

from .tolerance import assert_rule

# Pairwise: every shape, dtype and form appears; (129, 7) runs the backward's row loop several times per program.
CASES = [
    ((1,), torch.float32, "tanh"),
    ((1,), torch.bfloat16, "none"),
    ((7, 129), torch.float16, "none"),
    ((7, 129), torch.float32, "none"),
    ((7, 129), torch.bfloat16, "tanh"),
    ((3, 5, 257), torch.bfloat16, "tanh"),
    ((3, 5, 257), torch.float16, "tanh"),
    ((3, 5, 257), torch.float32, "none"),
    ((129, 7), torch.float32, "tanh"),
]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")


def _check_close(name, ours, theirs, ref, dtype):
    rows = ref.numel() // ref.shape[-1] if name == "dbias" else 1  # the bias gradient sums over the rows
    assert_rule(name, ours, theirs, ref, dtype, rows, atol=2 * torch.finfo(dtype).eps)


def _fwd_bwd(fn, x, b, grad, approximate):
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(x, b, approximate)
    y.backward(grad)
    return y.detach(), x.grad, b.grad


def _run_case(shape, dtype, approximate, device, x=None):
    if x is None:
        x = torch.randn(shape, device=device).to(dtype)
    b = torch.randn(shape[-1], device=device).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    ours = _fwd_bwd(bias_gelu, x, b, grad, approximate)
    theirs = _fwd_bwd(bias_gelu_reference, x, b, grad, approximate)  # PyTorch's own ops in `dtype`
    ref = _fwd_bwd(bias_gelu_reference, x.double(), b.double(), grad.double(), approximate)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert ours[0].shape == x.shape and ours[1].shape == x.shape and ours[2].shape == b.shape
    for name, o, t, r in zip(("y", "dx", "dbias"), ours, theirs, ref):
        _check_close(name, o, t, r, dtype)


@pytest.mark.parametrize("shape,dtype,approximate", CASES)
def test_forward_and_grads_match_float64(shape, dtype, approximate, device, triton_backend):
    _run_case(shape, dtype, approximate, device)


@pytest.mark.kernel_smoke
def test_smoke_both_forms(device, triton_backend):
    for approximate in ("tanh", "none"):
        _run_case((7, 129), torch.float32, approximate, device)


def test_strided_input(device, triton_backend):
    wide = torch.randn(9, 300, device=device)
    _run_case((9, 129), torch.float32, "tanh", device, x=wide[:, 3:132])  # row stride 300
    _run_case((9, 129), torch.float32, "none", device, x=wide[:, ::2][:, :129])  # last-dim stride 2: copied


def test_mixed_dtypes_compute_in_fp32(device, triton_backend):
    """bf16 x with an fp32 bias (what autocast hands the MLP): y, dx bf16; dbias fp32; the add is not rounded."""
    x = torch.randn(7, 129, device=device).bfloat16()
    b = torch.randn(129, device=device)
    grad = torch.randn(7, 129, device=device).bfloat16()
    ours = _fwd_bwd(bias_gelu, x, b, grad, "tanh")
    assert (ours[0].dtype, ours[1].dtype, ours[2].dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    theirs = _fwd_bwd(bias_gelu_reference, x, b.bfloat16(), grad, "tanh")  # all-bf16 torch: rounds x + b
    ref = _fwd_bwd(bias_gelu_reference, x.double(), b.double(), grad.double(), "tanh")
    for name, o, t, r in zip(("y", "dx", "dbias"), ours, theirs, ref):
        _check_close(name, o, t, r, torch.bfloat16)


def test_autocast_runs_in_dtype_of_x(device, triton_backend):
    """Elementwise under autocast: a bf16 matmul output stays bf16, an fp32 tensor stays fp32 (nothing is cast)."""
    inp = torch.randn(7, 33, device=device)
    w = torch.randn(129, 33, device=device, requires_grad=True)
    b = torch.randn(129, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        h = torch.nn.functional.linear(inp, w)
        y = bias_gelu(h, b, "none")
        y32 = bias_gelu(inp.new_empty(7, 129).normal_(), b, "none")
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    ref = bias_gelu_reference(h.detach().double(), b.detach().double(), "none")
    torch_bf16 = bias_gelu_reference(h.detach(), b.detach().bfloat16(), "none")
    _check_close("y", y.detach(), torch_bf16, ref, torch.bfloat16)
    y.float().sum().backward()
    assert b.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_compile_fullgraph_keeps_the_op(device, triton_backend):
    """torch.compile traces the custom op whole (no graph break) in forward and backward, and grads still flow."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def f(x, b):
        return bias_gelu(x * 2.0, b, "tanh").sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = torch.randn(7, 129, device=device, requires_grad=True)
    b = torch.randn(129, device=device, requires_grad=True)
    out = compiled(x, b)
    out.backward(torch.ones_like(out))
    assert "tinygraft.bias_gelu.default" in seen
    assert "tinygraft.bias_gelu_backward.default" in seen
    x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
    f(x2, b2).backward(torch.ones_like(out))
    torch.testing.assert_close(out, f(x2, b2))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_reference_runs_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("TINYGRAFT_BACKEND", raising=False)
    x, b = torch.randn(7, 129), torch.randn(129)
    assert torch.equal(bias_gelu(x, b), bias_gelu_reference(x, b))
    torch.testing.assert_close(bias_gelu(x, b, "none"), torch.nn.functional.gelu(x + b))


@pytest.mark.parametrize(
    "x_shape,b_shape,approximate,match",
    [
        ((7, 129), (128,), "tanh", "bias"),
        ((7, 129), (7, 129), "tanh", "bias"),
        ((), (1,), "tanh", "bias"),
        ((7, 129), (129,), "exact", "approximate"),
    ],
)
def test_bad_input_is_one_sentence(x_shape, b_shape, approximate, match):
    with pytest.raises(TinygraftError, match=match):
        bias_gelu(torch.randn(x_shape), torch.randn(b_shape), approximate)
    with pytest.raises(TinygraftError, match="floating"):
        bias_gelu(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int64))


def test_float64_and_empty_inputs(device, triton_backend):
    """fp64 inputs compute in fp64 (agreement to rounding: the kernel's sigmoid form is not torch's tanh), and a
    tensor with no rows gives empty outputs and a zero dbias."""
    x = torch.randn(7, 129, device=device, dtype=torch.float64)
    b = torch.randn(129, device=device, dtype=torch.float64)
    grad = torch.randn(7, 129, device=device, dtype=torch.float64)
    for approximate in ("tanh", "none"):
        ours = _fwd_bwd(bias_gelu, x, b, grad, approximate)
        ref = _fwd_bwd(bias_gelu_reference, x, b, grad, approximate)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    y, dx, db = _fwd_bwd(bias_gelu, x[:0], b, grad[:0], "tanh")
    assert y.shape == (0, 129) and dx.shape == (0, 129) and torch.equal(db, torch.zeros_like(b))
