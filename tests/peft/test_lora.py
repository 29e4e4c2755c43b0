"""LoRALinear, add_lora / merge / unmerge, adapter state, and the peft file layout, against transformers + peft."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from torch._dynamo.backends.debugging import aot_eager

from tinygraft.errors import TinygraftError
from tinygraft.models import GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.peft.files import CONFIG_NAME, adapter_config, load_adapter, read_adapter_config, save_adapter
from tinygraft.peft.lora import (
    LoRALinear,
    add_lora,
    load_lora_state_dict,
    lora_layers,
    lora_parameters,
    lora_settings,
    lora_state_dict,
    merge_lora,
    set_adapter,
    unload_lora,
    unmerge_lora,
)

transformers = pytest.importorskip("transformers", reason="transformers is the reference zoo (pip install .[dev])")
peft = pytest.importorskip("peft", reason="peft is the reference LoRA implementation (pip install .[dev])")


def randomize_b(model, adapter="default"):
    """B starts at zero; give it values so the adapter changes the output."""
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B[adapter].weight, std=0.5)


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ------------------------------------------------------------------------------------------------ the layer


def test_wrapped_layer_starts_identical_and_inits_like_peft():
    base = nn.Linear(40, 24)
    layer = LoRALinear(copy.deepcopy(base), r=8, alpha=16)
    x = torch.randn(3, 5, 40)
    assert torch.equal(layer(x), base(x))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (8, 40) and b.shape == (24, 8)
    assert torch.all(b == 0) and a.abs().max() <= 1 / math.sqrt(40) and a.std() > 0.1 / math.sqrt(40)
    assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_reads_as_the_math(use_rslora):
    layer = LoRALinear(nn.Linear(40, 24), r=4, alpha=12, use_rslora=use_rslora)
    randomize_b(layer)
    x = torch.randn(7, 40, dtype=torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 12 / (math.sqrt(4) if use_rslora else 4)
    expected = layer.base(x) + scale * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), expected)
    layer.fused = False
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_base_matches_the_equivalent_linear():
    conv = transformers.pytorch_utils.Conv1D(24, 40)  # weight (in, out) = (40, 24)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    lc, ll = LoRALinear(conv, r=4, alpha=8), LoRALinear(linear, r=4, alpha=8)
    assert lc.fan_in_fan_out and (lc.in_features, lc.out_features) == (40, 24)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(lc, name)["default"].weight.copy_(torch.randn_like(getattr(ll, name)["default"].weight))
            getattr(ll, name)["default"].weight.copy_(getattr(lc, name)["default"].weight)
    x = torch.randn(2, 6, 40)
    torch.testing.assert_close(lc(x), ll(x))


def test_fused_and_unfused_agree_on_gradients():
    layer = LoRALinear(nn.Linear(33, 20), r=4, alpha=8)
    randomize_b(layer)
    x = torch.randn(9, 33, requires_grad=True)
    grads = []
    for fused in (True, False):
        layer.fused = fused
        params = [x, *lora_parameters(layer)]
        grads.append(torch.autograd.grad(layer(x).square().sum(), params))
    for g_fused, g_plain in zip(*grads):
        torch.testing.assert_close(g_fused, g_plain)


def test_several_named_adapters():
    layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=2)
    layer.add_adapter("second", r=6, alpha=3)
    randomize_b(layer)
    randomize_b(layer, "second")
    x = torch.randn(4, 16)
    first = layer(x)
    layer.set_adapter("second")
    second = layer(x)
    a, b = layer.lora_A["second"].weight, layer.lora_B["second"].weight
    torch.testing.assert_close(second, layer.base(x) + 0.5 * x @ a.t() @ b.t())
    assert not torch.allclose(first, second)
    layer.set_adapter(None)
    assert torch.equal(layer(x), layer.base(x))
    with pytest.raises(TinygraftError, match="no LoRA adapter named 'third'"):
        layer.set_adapter("third")
    layer.delete_adapter("second")
    assert list(layer.lora_A) == ["default"] and layer.active_adapter is None


# ------------------------------------------------------------------------------------------------ model surgery


def test_add_lora_on_bert_matches_peft_targets_and_counts():
    for targets in (["query", "value"], "all-linear", r".*attention\.self\.(query|key)"):
        ours, theirs = tiny_bert(), tiny_bert()
        n = add_lora(ours, targets, r=4, alpha=8)
        ref = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        assert n == ref.get_nb_trainable_parameters()[0], targets
        theirs_paths = {
            name.removeprefix("base_model.model.")
            for name, m in ref.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)
        }
        assert {path for path, _ in lora_layers(ours)} == theirs_paths, targets
        assert all(not p.requires_grad for name, p in ours.named_parameters() if "lora_" not in name)


def test_add_lora_on_gpt2_wraps_conv1d_and_leaves_the_head():
    model = tiny_gpt2()
    n = add_lora(model, "all-linear", r=4, alpha=8)
    ref = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert n == ref.get_nb_trainable_parameters()[0]
    paths = [path for path, _ in lora_layers(model)]
    assert len(paths) == 2 * 4 and not any("lm_head" in p for p in paths)
    assert all(layer.fan_in_fan_out for _, layer in lora_layers(model))
    ids = torch.randint(0, 99, (2, 7))
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_add_lora_errors_name_the_problem():
    with pytest.raises(TinygraftError, match="matched no linear layer"):
        add_lora(tiny_bert(), ["kwery"], r=4)
    with pytest.raises(TinygraftError, match="is a BertSelfAttention"):
        add_lora(tiny_bert(), ["self"], r=4)
    with pytest.raises(TinygraftError, match="rank r must be a positive integer"):
        add_lora(tiny_bert(), ["query"], r=0)


def test_second_adapter_through_add_lora_and_state_dicts():
    base = tiny_bert()
    model = copy.deepcopy(base)
    add_lora(model, ["query"], r=4, alpha=8)
    randomize_b(model)
    add_lora(model, ["query"], r=2, alpha=2, adapter_name="other")
    assert {p.data_ptr() for p in lora_parameters(model)} == {
        p.data_ptr() for p in lora_parameters(model, "other")
    }  # the new one is active and trainable
    assert all(p.requires_grad for p in lora_parameters(model, "other"))
    assert not any(p.requires_grad for p in lora_parameters(model, "default"))
    state = lora_state_dict(model, "default")
    assert set(state) == {f"encoder.layer.{i}.attention.self.query.lora_{w}.weight" for i in (0, 1) for w in "AB"}
    ids = torch.randint(0, 99, (2, 5))
    set_adapter(model, "default")
    before = output(model, ids)
    fresh = copy.deepcopy(base)
    add_lora(fresh, ["query"], r=4, alpha=8)
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(output(fresh, ids), before, rtol=0, atol=0)
    with pytest.raises(TinygraftError, match="do not fit this model"):
        load_lora_state_dict(fresh, {k: v for k, v in list(state.items())[1:]})


def test_merged_equals_unmerged():
    model = tiny_gpt2().double()
    add_lora(model, "all-linear", r=4, alpha=8)
    randomize_b(model)
    ids = torch.randint(0, 99, (2, 7))
    model32 = copy.deepcopy(model).float()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = output(model, ids)
    merge_lora(model)
    torch.testing.assert_close(output(model, ids), unmerged, rtol=1e-12, atol=1e-12)  # same sums, float64
    assert not torch.equal(
        model.transformer.h[0].attn.c_attn.base.weight, original["transformer.h.0.attn.c_attn.base.weight"]
    )
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=1e-12, atol=1e-12)

    # float32: the merged model is as close to float64 as the unmerged one (tests/kernels/tolerance.py's rule)
    unmerged32 = output(model32, ids)
    merge_lora(model32)
    merged32 = output(model32, ids)
    err, err_unmerged = ((out.double() - unmerged).abs().max().item() for out in (merged32, unmerged32))
    assert err <= 2 * err_unmerged + torch.finfo(torch.float32).eps * unmerged.abs().max().item()
    unload_lora(model32, merge=False)
    assert not list(lora_layers(model32))
    assert torch.equal(output(model32, ids), merged32)


# ------------------------------------------------------------------------------------------------ peft layout


@pytest.mark.parametrize("build,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, "all-linear")])
def test_adapter_saved_here_loads_in_peft(build, targets, tmp_path):
    base = build()
    ours = copy.deepcopy(base)
    add_lora(ours, targets, r=4, alpha=8, use_rslora=True)
    randomize_b(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["fan_in_fan_out"] == (build is tiny_gpt2) and config["use_rslora"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, 99, (2, 7))
    assert not torch.allclose(output(ours, ids), output(base, ids))
    torch.testing.assert_close(output(theirs, ids), output(ours, ids))


@pytest.mark.parametrize("build,targets", [(tiny_bert, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_peft_adapter_loads_here(build, targets, tmp_path):
    base = build()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    n = load_adapter(ours, tmp_path)
    assert n == theirs.get_nb_trainable_parameters()[0]
    assert lora_settings(ours)["r"] == 4
    ids = torch.randint(0, 99, (2, 7))
    torch.testing.assert_close(output(ours, ids), output(theirs.eval(), ids))
    assert adapter_config(ours)["target_modules"]  # saved back: compact names that peft reads


def test_adapter_config_features_we_do_not_compute_are_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query"], bias="all"))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(TinygraftError, match="bias='all'"):
        read_adapter_config(tmp_path)
    with pytest.raises(TinygraftError, match="no adapter_config.json"):
        load_adapter(tiny_bert(), tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ torch.compile


def test_compiled_model_keeps_the_fused_op_in_one_graph(monkeypatch):
    """fullgraph=True: no graph break around the Triton op, which appears in the graph Dynamo hands the backend."""
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")

    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    add_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    randomize_b(model)
    model.eval()  # dropout off: a fresh seed per call would be a host sync, which fullgraph refuses
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = compiled(x)
    ops = (torch.ops.tinygraft.lora_linear, torch.ops.tinygraft.lora_linear.default)
    assert sum(node.target in ops for node in graphs[0].graph.nodes) == 2
    grads = torch.autograd.grad(y.square().sum(), [x, *lora_parameters(model)])
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, *lora_parameters(model)])
    torch.testing.assert_close(y, y_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)


def test_all_linear_leaves_our_tied_output_heads_alone():
    """Adapting a decoder tied to the input embeddings would change the embeddings too when merged."""

    bert = BERTForMaskedLM(BERTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=32, intermediate_size=40))
    gpt = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=32))
    for model, head in ((bert, "cls.predictions.decoder"), (gpt, "lm_head")):
        add_lora(model, "all-linear", r=2, alpha=4)
        wrapped = {name for name, _ in lora_layers(model)}
        assert head not in wrapped and len(wrapped) > 0
