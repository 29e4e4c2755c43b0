"""The chunked distillation loss: each divergence and its gradient against the formula in float64 (T^2 included,
ignored rows contributing nothing), chunk sizes that do not divide the rows, and one sentence for bad input."""

import pytest
import torch
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.kernels.kd_loss import kd_divergence, kd_loss

F64 = torch.float64


def inputs(N, V, Cs=12, Ct=20, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: (torch.randn(*s, generator=g, dtype=F64) * 0.7).to(dtype)  # noqa: E731
    return make(N, Cs).requires_grad_(), make(V, Cs).requires_grad_(), make(N, Ct), make(V, Ct)


def by_hand(s_logits, t_logits, T, divergence, beta, keep):
    """The divergences written out row by row from their definitions (no shared code with the module)."""
    total = 0.0
    for i in range(s_logits.shape[0]):
        if not keep[i]:
            continue
        q, p = torch.softmax(s_logits[i] / T, -1), torch.softmax(t_logits[i] / T, -1)
        if divergence == "forward":
            d = (p * (p.log() - q.log())).sum()
        elif divergence == "reverse":
            d = (q * (q.log() - p.log())).sum()
        else:
            m = beta * p + (1 - beta) * q
            d = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
        total = total + d
    return T * T * total / max(int(keep.sum()), 1)


@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("N,V,chunk", [(1, 7, 4), (7, 33, 3), (129, 50, 64)])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_each_divergence_and_its_gradients_equal_the_formula(divergence, beta, N, V, chunk, T):
    h_s, w_s, h_t, w_t = inputs(N, V, seed=N + V)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    labels[::3] = -100  # ignored rows
    keep = labels != -100
    got = kd_loss(h_s, w_s, h_t, w_t, labels, T, divergence, beta, chunk=chunk)
    gh, gw = torch.autograd.grad(got, (h_s, w_s))
    want = by_hand(h_s @ w_s.t(), h_t @ w_t.t(), T, divergence, beta, keep)
    wh, ww = torch.autograd.grad(want, (h_s, w_s)) if keep.any() else (torch.zeros_like(h_s), torch.zeros_like(w_s))
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=F64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, wh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ww, rtol=1e-9, atol=1e-12)
    assert gh[~keep].abs().max() == 0 if (~keep).any() else True  # ignored rows get no gradient


def test_forward_kl_equals_torchs_kl_div_and_the_logits_form():
    h_s, w_s, h_t, w_t = inputs(9, 40, seed=3)
    T = 2.0
    s, t = h_s @ w_s.t(), h_t @ w_t.t()
    torchs = F.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True,
                      reduction="batchmean") * T * T  # fmt: skip
    torch.testing.assert_close(kd_loss(h_s, w_s, h_t, w_t, temperature=T, chunk=4), torchs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd_divergence(s, t, T), torchs, rtol=1e-12, atol=1e-12)


def test_float32_inputs_and_a_tied_weight_reach_the_embedding():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)  # GPT ties its head to the token embedding
    ids = torch.randint(0, 50, (2, 5))
    h_s = emb(ids) * 2.0  # the hidden states depend on the embedding too
    h_t = torch.randn(2, 5, 24)
    loss = kd_loss(h_s, emb.weight, h_t, torch.randn(50, 24), chunk=3)
    loss.backward()
    assert loss.dtype == torch.float32 and emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_all_rows_ignored_is_zero_with_zero_gradients():
    h_s, w_s, h_t, w_t = inputs(4, 10)
    loss = kd_loss(h_s, w_s, h_t, w_t, torch.full((4,), -100), chunk=2)
    gh, gw = torch.autograd.grad(loss, (h_s, w_s))
    assert loss == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_bad_input_is_one_sentence():
    h_s, w_s, h_t, w_t = inputs(4, 10)
    with pytest.raises(TinygraftError, match="one of forward, reverse, jsd"):
        kd_loss(h_s, w_s, h_t, w_t, divergence="tv")
    with pytest.raises(TinygraftError, match="temperature must be a positive number"):
        kd_loss(h_s, w_s, h_t, w_t, temperature=0.0)
    with pytest.raises(TinygraftError, match=r"beta must be in \(0, 1\)"):
        kd_loss(h_s, w_s, h_t, w_t, divergence="jsd", beta=1.0)
    with pytest.raises(TinygraftError, match="needs the same one"):
        kd_loss(h_s, w_s, h_t, w_t[:7])
    with pytest.raises(TinygraftError, match="4 token rows and the teacher 3"):
        kd_loss(h_s, w_s, h_t[:3], w_t)
