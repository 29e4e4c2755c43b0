"""Flash-decoding (kernels/attention_decode_triton.py): split keys and a combine, against float64 naive attention
and against the forward kernel it stands in for, on decode shapes; the dispatcher's choice; `sample` through it.

The tolerance is test_attention.py's rule (tests/kernels/tolerance.py) for the output; the LSE the backward reads
must agree with the forward kernel's to fp32 rounding of a sum over S keys.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from tinygraft.kernels.attention import attention_reference, flash_attention

from .tolerance import assert_rule

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OLD_GPT_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "runs_v1" / "pretrain-gpt"

# Pairwise over S in {1, 7, 129, 4097}, T in {1, 3, 16}, heads (Hq, Hkv) in {(4, 4), (8, 2), (4, 1)} (grouped-query
# attention shares one key/value head's reads among its query heads), causal or not, padding none / random / a batch
# with every key padded, each dtype, D in {16, 64, 128}.
# (B, Hq, Hkv, T, S, D, causal, pad, dtype)
CASES = [
    (2, 4, 4, 1, 1, 16, True, None, F32),
    (1, 8, 2, 1, 7, 64, False, "random", BF16),
    (2, 4, 1, 3, 129, 16, True, "all", F16),
    (1, 8, 2, 3, 1, 16, True, "random", F32),
    (1, 4, 4, 16, 7, 16, True, None, F16),
    (2, 8, 2, 1, 129, 128, True, None, F32),
    (1, 4, 1, 16, 129, 64, False, None, BF16),
    (1, 4, 1, 1, 4097, 64, True, "random", F16),
    (1, 4, 2, 3, 4097, 16, False, None, BF16),
]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")


def _inputs(B, Hq, Hkv, T, S, D, pad, dtype, device):
    q = torch.randn(B, Hq, T, D, device=device, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=torch.float64) for _ in range(2))
    mask = None
    if pad is not None:
        mask = torch.rand(B, S, device=device) < 0.7
        if pad == "all":
            mask[0] = False
    return q, k, v, mask


def _both_paths(q, k, v, mask, causal, dtype):
    """(decode out, decode lse, forward-kernel out, forward-kernel lse) for the same inputs in `dtype`."""
    from tinygraft.kernels import attention_triton  # noqa: PLC0415 (it imports Triton)

    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = attention_triton._forward(q, k, v, mask, causal, scale, 0.0, 0)
    rows_out, rows_lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device, dtype=F32)
    pad, stride_pb = attention_triton._pad_args(mask, q)
    no_dropout = (False, 0, 0, 1.0)
    attention_triton._forward_rows(q, k, v, rows_out, rows_lse, pad, stride_pb, mask is not None, causal, scale,
                                   no_dropout)  # fmt: skip
    return out, lse, rows_out, rows_lse


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,pad,dtype", CASES)
def test_decode_matches_float64_and_the_forward_kernel(B, Hq, Hkv, T, S, D, causal, pad, dtype, device, spy_decode):
    q, k, v, mask = _inputs(B, Hq, Hkv, T, S, D, pad, dtype, device)
    out, lse, rows_out, rows_lse = _both_paths(q, k, v, mask, causal, dtype)
    assert spy_decode == [(T, S)], "the dispatcher did not send this decode shape to the split-key kernel"
    ref = attention_reference(q, k, v, causal, mask)
    theirs = attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), causal, mask)
    atol = 2 * torch.finfo(dtype).eps
    assert_rule("decode out", out, theirs, ref, dtype, S + D, atol=atol)
    assert_rule("forward-kernel out", rows_out, theirs, ref, dtype, S + D, atol=atol)
    assert out.dtype == dtype and lse.dtype == F32
    seen = torch.isfinite(rows_lse)
    assert torch.equal(seen, torch.isfinite(lse)), "rows that see no key differ between the paths"
    assert (lse[~seen] == float("inf")).all() and not out[~seen.unsqueeze(-1).expand_as(out)].any()
    # Both sum S exponentials in fp32 (in different orders and chunks): a relative fp32 rounding of sqrt(S) terms.
    budget = 4 * torch.finfo(F32).eps * math.sqrt(max(S, 1)) * (1 + rows_lse[seen].abs())
    assert ((lse[seen] - rows_lse[seen]).abs() <= budget).all()


@pytest.mark.kernel_smoke
def test_smoke_decode_gqa_padding(device, spy_decode):
    q, k, v, mask = _inputs(1, 8, 2, 1, 129, 16, "random", F32, device)
    out, lse, rows_out, rows_lse = _both_paths(q, k, v, mask, True, F32)
    assert spy_decode == [(1, 129)]
    ref = attention_reference(q, k, v, True, mask)
    theirs = attention_reference(q.float(), k.float(), v.float(), True, mask)
    assert_rule("decode out", out, theirs, ref, F32, 129 + 16, atol=2 * torch.finfo(F32).eps)
    torch.testing.assert_close(lse, rows_lse, rtol=1e-5, atol=1e-5)


def test_gradients_through_the_decode_forward(device, triton_backend):
    """The backward kernels read the decode path's LSE: T = 1 gradients against float64."""
    q, k, v, mask = _inputs(1, 8, 2, 1, 129, 64, "random", F32, device)
    do = torch.randn_like(q)
    grads = []
    for fn, dtype in ((flash_attention, F32), (attention_reference, F32), (attention_reference, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal=True, key_padding_mask=mask)
        out.backward(do.to(dtype))
        grads.append([out.detach()] + [t.grad for t in leaves])
    dot = math.sqrt(64) * max(t.abs().max().item() for t in (q, k, v, do))
    atol = 2 * torch.finfo(F32).eps * (1 + dot)
    for name, ours, theirs, ref in zip(("out", "dq", "dk", "dv"), *grads):
        assert_rule(name, ours, theirs, ref, F32, (129 if name in ("out", "dq") else 1) + 64, atol=atol)


@pytest.fixture
def spy_decode(monkeypatch, triton_backend):
    """The (T, S) of every call the dispatcher sends to the decode path."""
    from tinygraft.kernels import attention_decode_triton  # noqa: PLC0415 (it imports Triton)

    calls, real = [], attention_decode_triton.forward
    monkeypatch.setattr(attention_decode_triton, "forward", lambda q, k, *a: calls.append((q.shape[2], k.shape[2]))
                        or real(q, k, *a))  # fmt: skip
    return calls


def test_dispatcher_sends_only_few_rows_without_dropout(device, spy_decode):
    q, k, v, _ = _inputs(1, 4, 2, 1, 40, 16, None, F32, device)
    flash_attention(q.float(), k.float(), v.float(), causal=True)
    assert spy_decode == [(1, 40)]
    flash_attention(q.float(), k.float(), v.float(), causal=True, dropout_p=0.2, seed=3)  # dropout: forward kernel
    q_long, *_ = _inputs(1, 4, 2, 33, 40, 16, None, F32, device)
    flash_attention(q_long.float(), k.float(), v.float(), causal=True)  # 33 rows: forward kernel
    assert spy_decode == [(1, 40)]


def test_splits_fill_the_gpu_in_whole_chunks():
    from tinygraft.kernels import attention_decode_triton as dt  # noqa: PLC0415 (it imports Triton)

    cpu = torch.device("cpu")
    for S in (0, 1, 7, 129, 4097, 100_000):
        splits, chunk = dt.splits_for(1, 2, S, cpu)
        assert 1 <= splits <= dt.MAX_SPLITS and chunk % 64 == 0
        assert (splits - 1) * chunk < max(S, 1) <= splits * chunk or S == 0  # every key in one chunk, none empty


def test_sample_decodes_through_the_split_key_kernel(spy_decode, monkeypatch):
    """`tinygraft sample` on a GPT run: every step after the prompt goes through the decode path, and the greedy
    text equals the reference backend's."""
    from tinygraft.infer.sample import sample  # noqa: PLC0415

    kw = dict(prompt="The", max_new_tokens=6, temperature=0.0, top_k=None, device="cpu")
    ours = sample(str(OLD_GPT_RUN), **kw)
    steps = len(spy_decode)
    monkeypatch.setenv("TINYGRAFT_BACKEND", "reference")
    assert sample(str(OLD_GPT_RUN), **kw) == ours
    n_layer = json.loads((OLD_GPT_RUN / "config.json").read_text())["model"]["n_layer"]
    # the prompt (a few rows, so it too), then one row per new token after the first, in every layer
    assert steps == n_layer * 6 and all(t == 1 for t, _ in spy_decode[n_layer:steps])
