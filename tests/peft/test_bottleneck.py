"""Bottleneck adapters (Houlsby, Pfeiffer): the wrapped model starts as the base, only the adapters train, save and
reload in our layout, merging refused, on our GPT and BERT and on transformers' models (any nn.Module)."""

import copy

import pytest
import torch
import torch.nn as nn

from tinygraft.errors import TinygraftError
from tinygraft.peft.adapters import adapter_parameters, adapters_disabled, merge_adapter
from tinygraft.peft.bottleneck import BottleneckConfig, add_bottleneck, bottleneck_layers
from tinygraft.peft.files import load_adapter, read_adapter_config, save_adapter

from .test_ia3 import _ours, our_bert, our_gpt
from .test_lora import output, tiny_gpt2


def randomize(model):
    for _, layer in bottleneck_layers(model):
        for module in (*layer.adapter_down.values(), *layer.adapter_up.values()):
            nn.init.normal_(module.weight, std=0.3), nn.init.normal_(module.bias, std=0.3)


@pytest.mark.parametrize("build", [our_gpt, our_bert])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_starts_as_the_base_and_trains_only_the_adapters(build, variant):
    torch.manual_seed(0)
    model = build()
    ids, mask = torch.randint(0, 99, (3, 9)), torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    before = _ours(model, ids, mask)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    n = add_bottleneck(model, variant, reduction=8)
    paths = [p for p, _ in bottleneck_layers(model)]
    per_block = 2 if variant == "houlsby" else 1
    assert len(paths) == 2 * per_block
    assert n == 2 * per_block * (32 * 4 + 4 + 4 * 32 + 32)  # 32 -> 4 -> 32, with biases
    assert torch.equal(_ours(model, ids, mask), before)  # the up-projections start at zero
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(ids)[0] if build is our_gpt else model(ids, attention_mask=mask)[0]
        opt.zero_grad()
        out.float().pow(2).mean().backward()
        opt.step()
    trained = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapter_" not in k}
    assert trained.keys() == base_state.keys() and all(torch.equal(trained[k], base_state[k]) for k in base_state)
    model.eval()
    assert not torch.allclose(_ours(model, ids, mask), before)
    with adapters_disabled(model):
        assert torch.equal(_ours(model, ids, mask), before)


def test_saved_and_reloaded_gives_the_same_outputs_and_merging_is_refused(tmp_path):
    model = our_bert()
    add_bottleneck(model, "pfeiffer", reduction=4, act="gelu")
    randomize(model)
    ids, mask = torch.randint(0, 99, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    save_adapter(model, tmp_path)
    config = read_adapter_config(tmp_path)
    assert (config["peft_type"], config["variant"], config["reduction"], config["non_linearity"]) == (
        "BOTTLENECK", "pfeiffer", 4, "gelu")  # fmt: skip
    fresh = our_bert()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapter_" not in k})
    assert load_adapter(fresh, tmp_path) == sum(p.numel() for p in adapter_parameters(model))
    assert torch.equal(_ours(fresh, ids, mask), _ours(model, ids, mask))
    with pytest.raises(TinygraftError, match="non-linear, so they do not merge"):
        merge_adapter(model)


def test_any_module_transformers_gpt2_with_named_targets():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_bottleneck(model, "houlsby", ["attn.c_proj", "mlp.c_proj"], reduction=16)
    ids = torch.randint(0, 99, (2, 7))
    torch.testing.assert_close(output(model, ids), output(base, ids), rtol=0, atol=0)
    randomize(model)
    assert not torch.allclose(output(model, ids), output(base, ids))


def test_bad_settings_are_one_sentence():
    with pytest.raises(TinygraftError, match="--adapter-reduction must be a positive integer"):
        BottleneckConfig(adapter_reduction=0)
    with pytest.raises(TinygraftError, match="--adapter-act must be one of relu, gelu, silu, tanh"):
        BottleneckConfig(adapter_act="swish")
    with pytest.raises(TinygraftError, match="houlsby or pfeiffer"):
        add_bottleneck(our_gpt(), "lora")
    with pytest.raises(TinygraftError, match="knows BERT and GPT-2 module names"):
        add_bottleneck(nn.Sequential(nn.Linear(4, 4)))
