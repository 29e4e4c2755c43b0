"""flash_attention: the Triton kernel (interpreter on CPU, compiled on a GPU) against float64 naive attention.

Tolerance rule (tests/kernels/tolerance.py): for the output and each of dQ, dK, dV, the kernel's max error against
float64 `attention_reference` is at most twice the error of the same reference run by PyTorch in the kernel's dtype
(floored at the rounding error of a sum over the keys, or the queries, and the head dim), plus an atol: two ulps at
1.0 of the dtype, and the fp32 rounding of one length-D dot product of the inputs (eps_fp32 * sqrt(D) * max|input|).
The second term is FlashAttention-2's delta identity: the kernel's dS = P (dP - delta) cancels dP_ij = dO_i . V_j
against delta_i = dO_i . O_i, and where the softmax is nearly one-hot (S = 1, heavy padding) those are nearly equal
fp32 sums of D products in different orders, while PyTorch's softmax backward sums dP * P over the keys and cancels
exactly (with S = 1 the true dQ and dK are exactly 0).
Dropout runs on both sides with the same seed: the counter-based mask gives both paths the same bits.
"""

import math

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from tinygraft.errors import TinygraftError
from tinygraft.kernels import attention
from tinygraft.kernels.attention import attention_reference, flash_attention

from .tolerance import assert_rule

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Pairwise sweep, not a product: every T, S in {1, 17, 64, 129, 300} (T < S, T = S, T > S), D in {16, 64}, causal
# or not, heads (Hq, Hkv) in {(2, 2), (4, 2), (4, 1)}, padding none / random / a batch with every key padded,
# dropout or not, each dtype, and a (B, T, H, D) layout transposed into a strided view, meet in some case.
# Causal T > S leaves the first T - S rows with no visible key: their output and gradients must be 0.
# (B, Hq, Hkv, T, S, D, causal, pad, dropout_p, dtype, layout)
CASES = [
    (1, 2, 2, 1, 1, 16, False, None, 0.0, F32, "bhtd"),
    (2, 4, 2, 17, 17, 64, True, "random", 0.25, F16, "bhtd"),
    (1, 4, 1, 64, 64, 16, True, None, 0.0, BF16, "bthd"),
    (2, 2, 2, 129, 129, 64, False, "all", 0.0, F32, "bhtd"),
    (1, 2, 2, 300, 300, 16, True, "random", 0.0, F32, "bthd"),
    (1, 4, 2, 1, 300, 64, True, None, 0.0, F16, "bhtd"),
    (2, 4, 1, 17, 129, 16, True, "all", 0.25, F32, "bhtd"),
    (1, 2, 2, 300, 17, 64, True, None, 0.25, F32, "bthd"),
    (2, 4, 2, 129, 64, 16, False, "random", 0.0, BF16, "bhtd"),
    (2, 4, 1, 64, 300, 64, False, "all", 0.0, F16, "bthd"),
    (1, 2, 2, 300, 129, 64, False, "random", 0.25, BF16, "bhtd"),
    (1, 2, 2, 17, 1, 16, False, None, 0.0, F16, "bhtd"),
    (2, 4, 2, 129, 17, 64, True, "all", 0.0, BF16, "bthd"),
    (1, 4, 1, 64, 1, 16, True, "random", 0.0, F32, "bhtd"),
    (2, 2, 2, 1, 64, 16, False, "random", 0.25, BF16, "bhtd"),
    (1, 4, 2, 300, 64, 16, False, None, 0.25, F16, "bhtd"),
    (1, 2, 2, 64, 129, 64, True, None, 0.0, F16, "bhtd"),
    (2, 2, 2, 17, 300, 16, False, None, 0.0, F32, "bthd"),
]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")


def _check_close(name, ours, theirs, ref, dtype, k, dot_scale=4.0):
    atol = 2 * torch.finfo(dtype).eps + torch.finfo(torch.float32).eps * dot_scale
    assert_rule(name, ours, theirs, ref, dtype, k, atol=atol)


def _make(B, Hq, Hkv, T, S, D, pad, layout, device):
    """Fresh float64 q, k, v, dO and a (B, S) mask (None, random with P(keep) = 0.7, or batch 0 all padded)."""

    def tensor(H, L):
        if layout == "bthd":  # what a model's (B, T, C) -> (B, T, H, D) -> transpose gives: a strided view
            return torch.randn(B, L, H, D, device=device, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, H, L, D, device=device, dtype=torch.float64)

    q, k, v, do = tensor(Hq, T), tensor(Hkv, S), tensor(Hkv, S), tensor(Hq, T)
    mask = None
    if pad is not None:
        mask = torch.rand(B, S, device=device) < 0.7
        if pad == "all":
            mask[0] = False
    return q, k, v, do, mask


def _fwd_bwd(fn, q, k, v, do, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(do.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _run_case(B, Hq, Hkv, T, S, D, causal, pad, dropout_p, dtype, layout, device, **extra):
    q, k, v, do, mask = _make(B, Hq, Hkv, T, S, D, pad, layout, device)
    kw = dict(causal=causal, key_padding_mask=mask, dropout_p=dropout_p, seed=1234, **extra)
    ours = _fwd_bwd(flash_attention, q, k, v, do, dtype, **kw)
    theirs = _fwd_bwd(attention_reference, q, k, v, do, dtype, **kw)  # PyTorch's own ops in `dtype`
    ref = _fwd_bwd(attention_reference, q, k, v, do, torch.float64, **kw)
    dot_scale = math.sqrt(D) * max(t.abs().max().item() for t in (q, k, v, do) if t.numel())
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        _check_close(name, o, t, r, dtype, (S if name in ("out", "dq") else T) + D, dot_scale)
    return ours


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,pad,dropout_p,dtype,layout", CASES)
def test_forward_and_grads_match_float64(
    B, Hq, Hkv, T, S, D, causal, pad, dropout_p, dtype, layout, device, triton_backend
):
    ours = _run_case(B, Hq, Hkv, T, S, D, causal, pad, dropout_p, dtype, layout, device)
    if causal and T > S:  # rows that see no key: exactly zero, not merely close
        for t in ours[:2]:
            assert not t[:, :, : T - S].any()


@pytest.mark.kernel_smoke
def test_smoke_causal_gqa_padding(device, triton_backend):
    _run_case(2, 4, 2, 33, 40, 16, True, "random", 0.0, F32, "bhtd", device)


@pytest.mark.parametrize("D", [32, 128])
def test_other_head_dims(D, device, triton_backend):
    _run_case(1, 2, 1, 40, 23, D, True, "random", 0.1, F32, "bhtd", device)


def test_softmax_scale(device, triton_backend):
    _run_case(1, 2, 2, 33, 47, 64, False, None, 0.0, F16, "bhtd", device, softmax_scale=0.3)


def test_smallest_blocks_walk_many_diagonal_tiles(device, triton_backend, monkeypatch):
    """Under the interpreter, 16 x 16 tiles: many skipped, diagonal and full tiles per program, both T vs S."""
    if device.type != "cpu":
        pytest.skip("the fixed interpreter blocks apply only under TRITON_INTERPRET; a GPU autotunes its own")
    from tinygraft.kernels import attention_triton  # noqa: PLC0415 (it imports Triton)

    tiny = {"BLOCK_M": 16, "BLOCK_N": 16}
    monkeypatch.setattr(attention_triton, "_INTERPRET", {"fwd": tiny, "dkdv": tiny, "dq": tiny})
    _run_case(1, 2, 1, 70, 53, 16, True, "random", 0.0, F32, "bhtd", device)
    _run_case(1, 2, 2, 53, 70, 16, True, None, 0.2, F32, "bhtd", device)


def test_dropout_is_a_pure_function_of_the_seed(device, triton_backend):
    q, k, v = (torch.randn(1, 2, 33, 16, device=device) for _ in range(3))
    a = flash_attention(q, k, v, dropout_p=0.5, seed=7)
    assert torch.equal(a, flash_attention(q, k, v, dropout_p=0.5, seed=7))
    assert not torch.equal(a, flash_attention(q, k, v, dropout_p=0.5, seed=8))
    torch.manual_seed(3)
    b = flash_attention(q, k, v, dropout_p=0.5)  # the seed comes from torch's RNG
    torch.manual_seed(3)
    assert torch.equal(b, flash_attention(q, k, v, dropout_p=0.5))


def test_autocast_casts_like_a_matmul(device, triton_backend):
    """Under autocast fp32 q, k, v run in the autocast dtype; gradients reach the fp32 leaves."""
    q, k, v, do, mask = _make(2, 2, 2, 17, 33, 16, "random", "bhtd", device)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    with torch.autocast(device.type, dtype=BF16):
        out = flash_attention(*leaves, causal=True, key_padding_mask=mask)
    assert out.dtype == BF16
    out.backward(do.to(BF16))
    assert all(t.grad.dtype == F32 for t in leaves)
    kw = dict(causal=True, key_padding_mask=mask)
    theirs = _fwd_bwd(attention_reference, q, k, v, do, BF16, **kw)
    ref = _fwd_bwd(attention_reference, q, k, v, do, torch.float64, **kw)
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], theirs, ref):
        _check_close(name, o, t, r, BF16, (33 if name in ("out", "dq") else 17) + 16)


def test_compile_fullgraph_keeps_the_op(device, triton_backend):
    """torch.compile traces the custom op whole (no graph break) in forward and backward, and grads still flow."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def f(q, k, v, mask):
        return flash_attention(q * 2.0, k, v, causal=True, key_padding_mask=mask).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    q, k, v, _, mask = _make(1, 4, 2, 17, 23, 16, "random", "bhtd", device)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves, mask)
    out.backward(torch.ones_like(out))
    assert "tinygraft.flash_attention.default" in seen
    assert "tinygraft.flash_attention_backward.default" in seen
    eager = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = f(*eager, mask)
    expected.backward(torch.ones_like(out))
    torch.testing.assert_close(out, expected)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_empty_sequences(device, triton_backend):
    """No queries: empty output; no keys: every row sees nothing, so zeros and zero gradients."""
    q, k, v = (torch.randn(1, 2, n, 16, device=device, requires_grad=True) for n in (0, 5, 5))
    assert flash_attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = (torch.randn(1, 2, n, 16, device=device, requires_grad=True) for n in (5, 0, 0))
    out = flash_attention(q, k, v)
    out.sum().backward()
    assert not out.any() and not q.grad.any()


def test_reference_runs_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("TINYGRAFT_BACKEND", raising=False)
    q, k, v = (torch.randn(1, 2, 9, 24) for _ in range(3))  # head dim 24: reference only, and that is fine
    torch.testing.assert_close(flash_attention(q, k, v), attention_reference(q, k, v))
    assert attention.backend.backend_for(q, k, v) == "reference"


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((1, 2, 3, 16), (1, 2, 4, 16), (1, 2, 4, 16)), {}, None),  # fine: T != S
        (((2, 3, 16), (1, 2, 4, 16), (1, 2, 4, 16)), {}, "4-d"),
        (((1, 2, 3, 16), (1, 2, 4, 16), (1, 2, 5, 16)), {}, "k and v"),
        (((1, 3, 3, 16), (1, 2, 4, 16), (1, 2, 4, 16)), {}, "multiple"),
        (
            ((1, 2, 3, 16), (1, 2, 4, 16), (1, 2, 4, 16)),
            {"key_padding_mask": torch.ones(1, 3, dtype=torch.bool)},
            "key_padding_mask",
        ),
        (((1, 2, 3, 16), (1, 2, 4, 16), (1, 2, 4, 16)), {"dropout_p": 1.0}, "dropout_p"),
    ],
)
def test_bad_input_is_one_sentence(shapes, kw, match):
    q, k, v = (torch.randn(s) for s in shapes)
    if match is None:
        assert flash_attention(q, k, v, **kw).shape == q.shape
        return
    with pytest.raises(TinygraftError, match=match):
        flash_attention(q, k, v, **kw)


def test_forced_triton_names_what_it_cannot_run(device, triton_backend):
    q = torch.randn(1, 2, 3, 24, device=device)
    with pytest.raises(TinygraftError, match="head dims"):
        flash_attention(q, q, q)
    q = torch.randn(1, 2, 3, 16, device=device, dtype=torch.float64)
    with pytest.raises(TinygraftError, match="float64"):
        flash_attention(q, q, q)
    with pytest.raises(TinygraftError, match="one dtype"):
        flash_attention(q.float(), q.half(), q.half())


def test_reference_dropout_index_matches_the_contract():
    """attention_reference draws element (b, h, i, j) from index ((b*Hq + h)*T + i)*S + j, the kernel's index."""
    B, H, T, S, p = 2, 3, 5, 7, 0.4
    keep = attention.dropout_keep(11, p, B, H, T, S, "cpu")
    b, h, i, j = 1, 2, 3, 4
    index = torch.tensor([((b * H + h) * T + i) * S + j])
    assert keep[b, h, i, j] == attention.rng.keep_mask(11, index, p)[0]
    assert math.isclose(keep.float().mean().item(), 1 - p, abs_tol=0.1)
