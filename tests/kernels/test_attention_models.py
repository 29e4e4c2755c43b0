"""The attention kernel inside the models: GPT and BERT give the same logits and gradients with the Triton kernel
and with the reference path, and a KV-cache decode step through the kernel equals the full forward.

Only attention's dispatch is switched (the other kernels keep their default path), so a difference here is the
attention kernel's. Tolerance rule (tests/kernels/tolerance.py): the kernel model's error against the float64
reference model is at most twice the fp32 reference model's error (floored at the rounding error of a sum over the
sequence and the width), plus two fp32 ulps at the largest magnitude of the output (for the output) or of all
gradients (for a gradient): the key bias's true gradient is exactly 0 (softmax ignores
a per-row constant), so there both paths give pure rounding noise at the scale of the other gradients.
"""

import copy

import pytest
import torch

from tinygraft.kernels import attention, attention_triton
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig

from .tolerance import assert_rule


@pytest.fixture
def use_kernel(monkeypatch):
    """use_kernel(True) routes flash_attention to the Triton kernel, use_kernel(False) to the reference; the
    test's end checks that the kernel really ran."""
    kernel_calls = []
    real = attention_triton.flash_attention_triton

    def counted(*args):
        kernel_calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(attention_triton, "flash_attention_triton", counted)

    def switch(on: bool):
        monkeypatch.setattr(attention, "_use_triton", lambda q, k, v: on)

    yield switch
    assert kernel_calls, "the Triton kernel never ran"


def _check_close(name, ours, theirs, ref, scale=None, k=64):
    """k: the longest sum behind a value in these small models (a sequence of up to 37 tokens, a width of 32 or 64)."""
    atol = 2 * torch.finfo(torch.float32).eps * (scale if scale is not None else ref.abs().max().item())
    assert_rule(name, ours, theirs, ref, torch.float32, k, scale=scale, atol=atol)


def _compare(run, model, device):
    """run(model) -> (output, upstream-grad-applied model); compare outputs and every parameter's gradient."""
    results = []
    for dtype in (torch.float32, torch.float32, torch.float64):
        m = copy.deepcopy(model).to(device=device, dtype=dtype)
        results.append((run(m), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (ours, ours_g), (theirs, theirs_g), (ref, ref_g) = results
    _check_close("output", ours, theirs, ref)
    assert ours_g.keys() == ref_g.keys() and ours_g
    scale = max(g.abs().max().item() for g in ref_g.values())
    for name in ref_g:
        _check_close(name, ours_g[name], theirs_g[name], ref_g[name], scale)


def test_gpt_same_logits_and_grads(use_kernel, device):
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 97, (2, 37), device=device)
    grad = torch.randn(2, 37, 97, device=device, dtype=torch.float64)
    paths = iter([True, False, False])  # kernel fp32, reference fp32, reference float64

    def run(m):
        use_kernel(next(paths))
        logits, _ = m(idx)
        logits.backward(grad.to(logits.dtype))
        return logits.detach()

    _compare(run, model, device)


def test_bert_same_outputs_and_grads_with_padding_and_attention_dropout(use_kernel, device):
    """Train mode with attention dropout (the counter-based mask is the same on both paths and in float64), one
    sequence partly padded and one fully padded (its rows see no key: zeros, not NaN)."""
    config = BERTConfig(
        vocab_size=97,
        max_position_embeddings=64,
        n_layer=2,
        n_head=2,
        n_embd=32,
        intermediate_size=64,
        dropout=0.0,
        attention_dropout=0.1,
    )
    model = BERT(config).train()
    ids = torch.randint(1, 97, (3, 29), device=device)
    mask = torch.ones(3, 29, dtype=torch.long, device=device)
    mask[1, 17:] = 0
    mask[2] = 0
    grad = torch.randn(3, 29, 32, device=device, dtype=torch.float64)
    paths = iter([True, False, False])

    def run(m):
        use_kernel(next(paths))
        torch.manual_seed(1)  # the same attention-dropout seeds on every path
        hidden = m(ids, attention_mask=mask).last_hidden_state
        hidden.backward(grad.to(hidden.dtype))
        assert torch.isfinite(hidden).all()
        return hidden.detach()

    _compare(run, model, device)


def test_kv_cache_decode_through_the_kernel_equals_full_forward(use_kernel, device):
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)).to(device).eval()
    idx = torch.randint(0, 97, (2, 21), device=device)
    with torch.no_grad():
        use_kernel(False)
        ref = copy.deepcopy(model).double()(idx)[0]
        full = model(idx)[0]  # the reference path in fp32: the error budget
        use_kernel(True)
        cache = model.new_kv_cache(2)
        steps = [model(idx[:, :13], kv_cache=cache)[0]]  # prefill, then one token at a time (T=1 vs S keys)
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(13, 21)]
    decoded = torch.cat(steps, dim=1)
    assert cache.length == 21
    _check_close("decoded logits", decoded, full, ref)
