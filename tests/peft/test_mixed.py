"""Mixed-adapter batches (adapters.mixed_batch): one forward and backward with each row through its own adapter
equals running each row alone with set_adapter, outputs and every adapter's gradient, for each method."""

import pytest
import torch
import torch.nn as nn

from tinygraft.errors import TinygraftError
from tinygraft.models import GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.peft.adapters import adapter_layers, merge_adapter, mixed_batch, set_adapter
from tinygraft.peft.api import add_adapter

V = 99
# Each adapter of a batch differs in its settings where the method has them, so padding and gathering show.
SETTINGS = {
    "lora": [dict(r=2, alpha=4), dict(r=5, alpha=3), dict(r=3, alpha=8, use_rslora=True)],
    "dora": [dict(r=2, alpha=4), dict(r=4, alpha=3), dict(r=3, alpha=8)],
    "ia3": [{}, {}, {}],
    "houlsby": [dict(reduction=8), dict(reduction=4, act="gelu"), dict(reduction=16)],
    "pfeiffer": [dict(reduction=8), dict(reduction=4, act="tanh"), dict(reduction=8)],
}


def our_gpt():
    return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32))


def our_bert():
    cfg = BERTConfig(vocab_size=V, max_position_embeddings=16, n_layer=2, n_head=2, n_embd=32, intermediate_size=37,
                     dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return BERTForMaskedLM(cfg)


def with_adapters(build, method):
    model = build().eval().double()  # float64: the per-row and mixed sums then agree to ~1e-12
    for name, settings in zip("abc", SETTINGS[method]):
        add_adapter(model, method, name=name, **settings)
    with torch.no_grad():  # move every adapter off its identity start, so each row's output shows its adapter
        for _, layer in adapter_layers(model):
            for n in layer.settings:
                for t in layer.adapter_tensors(n).values():
                    t.add_(torch.randn_like(t) * 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for n in layer.settings:
            for t in layer.adapter_tensors(n).values():
                t.requires_grad_(True)
    return model


def forward(model, ids, mask):
    return model(ids)[0] if isinstance(model, GPT) else model(ids, attention_mask=mask)[0]


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [our_gpt, our_bert])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_a_mixed_batch_equals_each_row_alone(build, method):
    torch.manual_seed(0)
    model = with_adapters(build, method)
    names = ["b", None, "a", "c", "b"]  # a row of the base alone too
    ids = torch.randint(1, V, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[3, 4:] = False
    with mixed_batch(model, names):
        out = forward(model, ids, mask)
        (out**2).sum().backward()
    together = grads(model)
    model.zero_grad()
    for i, name in enumerate(names):
        set_adapter(model, name)
        row = forward(model, ids[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(out[i : i + 1].detach(), row.detach(), rtol=1e-10, atol=1e-10)
        if name is not None:  # the base alone has nothing to train
            (row**2).sum().backward()
    alone = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert together.keys() == alone.keys()
    for k in together:
        torch.testing.assert_close(together[k], alone[k], rtol=1e-9, atol=1e-10)
    assert all(layer.row_adapters is None for _, layer in adapter_layers(model))  # the block restored it


def test_mixed_batches_refuse_merged_adapters_and_wrong_batches():
    model = with_adapters(our_gpt, "lora")
    with pytest.raises(TinygraftError, match="names 3 rows' adapters but the LoRA layer got a batch of 2"):
        with mixed_batch(model, ["a", "b", "c"]):
            model(torch.randint(1, V, (2, 4)))
    set_adapter(model, "a")
    merge_adapter(model)
    with pytest.raises(TinygraftError, match="merged into the base weights; unmerge it before a mixed batch"):
        with mixed_batch(model, ["a", "b"]):
            pass


def test_mixed_rows_work_on_a_plain_module():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))
    add_adapter(model, "lora", name="x", r=2, targets=["0", "2"])
    add_adapter(model, "lora", name="y", r=3, targets=["0", "2"])
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for n in "xy":
                layer.lora_B[n].weight.normal_()
    x = torch.randn(4, 12)  # float32: one row's sums in one order either way
    with mixed_batch(model, ["y", "x", "x", None]):
        out = model(x)
    for i, name in enumerate(["y", "x", "x", None]):
        set_adapter(model, name)
        torch.testing.assert_close(out[i], model(x[i : i + 1])[0])
