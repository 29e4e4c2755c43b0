"""EWC: the empirical Fisher is the per-sequence mean of squared gradients (not the squared mean gradient); the
penalty is zero at the anchor with gradient lambda F (theta - theta*); through an adapter it penalises what the
adapter changes in each weight, the same number as the merged model's."""

import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.peft import add_adapter
from tinygraft.peft.adapters import adapter_layers, merge_adapter
from tinygraft.tasks.lm import objective_for
from tinygraft.train import methods
from tinygraft.train.ewc import EWC, check_method, fisher_diagonal

LOSS = objective_for("gpt").loss


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(cfg).double()


def sequences(n: int, length: int = 9, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 37, (1, length + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def test_fisher_is_the_mean_of_per_sequence_squared_gradients_not_the_squared_mean():
    model, seqs = tiny_gpt(), sequences(7)
    fisher = fisher_diagonal(model, LOSS, seqs)
    params = dict(model.named_parameters())
    # Reference: per-sequence gradients from torch.func, independent of the loop under test.
    state = {k: v.detach() for k, v in params.items()}

    def loss_of(p, x, y):
        return torch.func.functional_call(model, p, (x, y))[1]

    per_seq = [torch.func.grad(loss_of)(state, x, y) for x, y in seqs]
    for name in params:
        want = torch.stack([g[name] for g in per_seq]).pow(2).mean(0)
        torch.testing.assert_close(fisher[name], want.float(), rtol=1e-5, atol=1e-12)
    mean_sq = {n: torch.stack([g[n] for g in per_seq]).mean(0).pow(2) for n in params}
    total_f = sum(float(f.sum()) for f in fisher.values())
    total_m = sum(float(m.sum()) for m in mean_sq.values())
    assert total_m < 0.8 * total_f  # the squared mean gradient is a different, smaller quantity
    assert model.training and all(p.grad is None for p in model.parameters())  # left as found


def test_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_f_delta():
    model = tiny_gpt()
    fisher = {n: torch.rand_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    anchor = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    ewc = EWC(3.0, fisher, anchor)
    assert float(ewc.penalty(model)) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.zero_grad()
    value = ewc.penalty(model)
    value.backward()
    want = 0.0
    for n, p in model.named_parameters():
        delta = p.detach() - anchor[n].double()
        want += 1.5 * float((fisher[n].double() * delta**2).sum())
        torch.testing.assert_close(p.grad, 3.0 * fisher[n].double() * delta, rtol=1e-5, atol=1e-7)
    assert float(value) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("method, settings", [("lora", {"r": 3}), ("dora", {"r": 2}), ("ia3", {})])
def test_through_an_adapter_the_penalty_is_the_merged_models(method, settings):
    model = tiny_gpt()
    fisher = {n: torch.rand_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    anchor = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    targets = {"targets": ["c_attn", "c_fc"]} if method != "ia3" else {}
    add_adapter(model, method, **settings, **targets)
    model.double()
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for t in layer.adapter_tensors(layer.active_adapter).values():
                t.add_(0.2 * torch.randn_like(t))
    ewc = EWC(2.0, fisher, anchor)
    through = float(ewc.penalty(model))
    assert through > 0
    merge_adapter(model)
    merged = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".base." in n or "lora" not in n}
    want = sum(float((fisher[n].double() * (merged[n].detach() - anchor[n].double()) ** 2).sum()) for n in anchor)
    assert through == pytest.approx(want, rel=1e-5)


def test_ewc_saves_and_loads_and_refuses_methods_that_change_no_weights(tmp_path):
    model = tiny_gpt()
    fisher = fisher_diagonal(model, LOSS, sequences(3))
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    EWC(1.0, fisher, anchor).save(tmp_path)
    again = EWC.load(1.0, tmp_path)
    assert set(again.fisher) == set(fisher)
    assert all(torch.equal(again.fisher[k], fisher[k]) for k in fisher)
    with pytest.raises(TinygraftError, match="is missing"):
        EWC.load(1.0, tmp_path / "elsewhere")
    for name in ("houlsby", "prompt-tuning", "prefix-tuning"):
        with pytest.raises(TinygraftError, match="changes none"):
            check_method(methods.METHODS[name]())
    check_method(methods.METHODS["lora"]())
