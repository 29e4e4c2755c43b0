"""Many adapters of several methods on one base, through `tinygraft.peft`: add, switch, disable, delete, save each
alone; switching copies nothing and the base never changes."""

import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.models import BERTConfig, BERTForMaskedLM
from tinygraft.peft import (
    adapter_state_dict,
    adapters_disabled,
    add_adapter,
    delete_adapter,
    load_adapter,
    save_adapter,
    set_adapter,
    train_adapters,
)
from tinygraft.peft.adapters import adapter_layers, adapter_parameters

from .test_ia3 import _ours, our_bert


def _move(model, name):
    """Every tensor of adapter `name` away from its initial value (so each adapter changes the output)."""
    with torch.no_grad():
        for tensor in adapter_state_dict(model, name).values():
            tensor.add_(torch.randn_like(tensor) * 0.3)


def test_adapters_of_several_methods_share_one_base(tmp_path):
    torch.manual_seed(0)
    model = our_bert()
    ids, mask = torch.randint(0, 99, (2, 7)), torch.ones(2, 7, dtype=torch.bool)
    base_out = _ours(model, ids, mask)
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    add_adapter(model, "lora", name="sst2", targets=["query", "value"], r=4)
    add_adapter(model, "dora", name="docs", targets=["query", "value"], r=2)
    add_adapter(model, "ia3", name="tags", targets=["key"], feedforward=[])
    add_adapter(model, "pfeiffer", name="small", reduction=8)
    outs = {}
    for name in ("sst2", "docs", "tags", "small"):
        set_adapter(model, name)
        _move(model, name)
        outs[name] = _ours(model, ids, mask)
        active = {layer.active_adapter for _, layer in adapter_layers(model)}
        assert active == {name, None}  # its layers run it, every other adapter layer runs the base alone
    assert all(not torch.allclose(outs[a], outs[b]) for a in outs for b in outs if a < b)
    for name, want in outs.items():  # switching back and forth gives each its own function again
        set_adapter(model, name)
        assert torch.equal(_ours(model, ids, mask), want)
        with adapters_disabled(model):
            assert torch.equal(_ours(model, ids, mask), base_out)
    set_adapter(model, "docs")
    save_adapter(model, tmp_path / "docs", adapter_name="docs")
    fresh = our_bert()  # the same base weights, under their plain names
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".base." in k or
             not any(s in k for s in ("lora_", "ia3_l", "adapter_"))}  # fmt: skip
    fresh.load_state_dict(state)
    load_adapter(fresh, tmp_path / "docs", adapter_name="docs")
    assert torch.equal(_ours(fresh, ids, mask), outs["docs"])
    delete_adapter(model, "sst2")
    with pytest.raises(TinygraftError, match="no adapter named 'sst2'"):
        set_adapter(model, "sst2")
    ptrs = {n.replace(".base.", "."): p.data_ptr() for n, p in model.named_parameters()}
    assert all(ptrs[n] == ptr for n, ptr in base_ptrs.items())  # the base tensors never moved or were copied


def test_bad_calls_are_one_sentence():
    model = our_bert()
    with pytest.raises(TinygraftError, match="unknown adapter method 'prompt'"):
        add_adapter(model, "prompt")
    with pytest.raises(TinygraftError, match="lora adapters have no setting 'rank'"):
        add_adapter(model, "lora", rank=4)
    with pytest.raises(TinygraftError, match="no adapter named 'x' \\(its adapters: none\\)"):
        set_adapter(model, "x")


@pytest.mark.parametrize("method,settings", [
    ("lora", {"r": 4, "targets": ["query", "value"]}), ("dora", {"r": 4, "targets": ["query", "value"]}),
    ("ia3", {}), ("houlsby", {}), ("pfeiffer", {}), ("prompt-tuning", {"num_virtual_tokens": 3}),
    ("prefix-tuning", {"num_virtual_tokens": 3}),
])  # fmt: skip
def test_an_adapter_saved_for_another_base_is_one_sentence(method, settings, tmp_path):
    small = our_bert()
    add_adapter(small, method, name="x", **settings)
    save_adapter(small, tmp_path, adapter_name="x")
    wider = BERTForMaskedLM(BERTConfig(**{**small.config.__dict__, "n_embd": 64}))
    with pytest.raises(TinygraftError) as err:
        load_adapter(wider, tmp_path, adapter_name="x")
    message = str(err.value)
    assert "\n" not in message and ("32" in message and "64" in message), message


def test_one_method_per_layer_and_training_several_adapters_together():
    model = our_bert()
    add_adapter(model, "lora", name="a", r=2, targets=["key"])
    with pytest.raises(TinygraftError, match="already holds LoRA adapters and a layer holds adapters of one method"):
        add_adapter(model, "ia3", name="b")  # "auto" targets the keys too
    add_adapter(model, "lora", name="c", r=3, targets=["key"])
    assert not any(p.requires_grad for p in adapter_parameters(model, "a"))  # each add trains only its own
    n = train_adapters(model, ["a", "c"])
    assert n == sum(p.numel() for name in "ac" for p in adapter_parameters(model, name))
    with pytest.raises(TinygraftError, match="no adapter named 'zz'"):
        train_adapters(model, ["zz"])
