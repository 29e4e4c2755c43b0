"""DoRA (LoRALinear with use_dora): the math, the detached norm, fused vs unfused, merge and unmerge, peft's layout
both ways on transformers' BertModel and GPT2LMHeadModel, and `--method dora` through the loop's CLI."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygraft.cli.main import main
from tinygraft.peft.files import load_adapter, read_adapter_config, save_adapter
from tinygraft.peft.lora import LoRALinear, add_lora, lora_layers, merge_lora, unmerge_lora
from tinygraft.train.methods import make_method

from ..cli.tiny_runs import TINY, write_corpus
from .test_lora import output, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft", reason="peft is the reference DoRA implementation (pip install .[dev])")


def randomize(model):
    """B starts at zero and m at ||W||: move both so the adapter changes the output."""
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
        with torch.no_grad():
            m = layer.lora_magnitude_vector["default"]
            m.mul_(torch.rand_like(m) + 0.5)


def _layer(fused):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), r=2, alpha=4, fused=fused, use_dora=True)
    randomize(nn.ModuleDict({"l": layer}))
    return base, layer


def test_forward_reads_as_the_math_and_starts_as_the_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    fresh = LoRALinear(copy.deepcopy(base), r=2, alpha=4, use_dora=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh.lora_magnitude_vector["default"], base.weight.norm(dim=1))
    torch.testing.assert_close(fresh(x), base(x), rtol=1e-6, atol=1e-6)  # m / ||W|| = 1
    base, layer = _layer(fused=True)
    a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    s = layer.settings["default"].scaling
    direction = base.weight + s * b @ a
    want = (m / direction.norm(dim=1)) * F.linear(x, direction) + base.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_fused_and_unfused_agree_and_the_norm_is_detached():
    x = torch.randn(4, 6, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        _, layer = _layer(fused)
        layer = layer.double()
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        params.append(layer.lora_magnitude_vector["default"])
        xi = x.clone().requires_grad_()
        layer(xi).pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in params])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # the norm outside the graph: dL/dB is the LoRA path's alone, scaled by m / n (held constant)
    _, layer = _layer(False)
    layer = layer.double()
    a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    s = layer.settings["default"].scaling
    n = (layer.base.weight + s * b @ a).norm(dim=1).detach()
    manual = (m / n) * (F.linear(x, layer.base.weight) + s * F.linear(F.linear(x, a), b)) + layer.base.bias
    got_b = torch.autograd.grad(layer(x).pow(2).sum(), b)[0]
    torch.testing.assert_close(got_b, torch.autograd.grad(manual.pow(2).sum(), b)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("build,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, "all-linear")])
def test_merge_unmerge_and_peft_both_ways(build, targets, tmp_path):
    base = build()
    ours = copy.deepcopy(base)
    add_lora(ours, targets, r=4, alpha=8, use_dora=True)
    ids = torch.randint(0, 99, (2, 7))
    torch.testing.assert_close(output(ours, ids), output(base, ids), rtol=1e-5, atol=1e-5)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    assert read_adapter_config(tmp_path / "ours")["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, ids), output(ours, ids), rtol=1e-5, atol=1e-5)

    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=True, init_lora_weights=False)
    trained = peft.get_peft_model(copy.deepcopy(base), config)
    trained.save_pretrained(tmp_path / "theirs")
    loaded = copy.deepcopy(base)
    assert load_adapter(loaded, tmp_path / "theirs") == trained.get_nb_trainable_parameters()[0]
    torch.testing.assert_close(output(loaded, ids), output(trained.eval(), ids), rtol=1e-5, atol=1e-5)

    model = copy.deepcopy(ours).double()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = output(model, ids)
    merge_lora(model)
    torch.testing.assert_close(output(model, ids), unmerged, rtol=1e-12, atol=1e-12)
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=1e-12, atol=1e-12)


def test_method_dora_through_the_cli(tmp_path, capsys):
    method = make_method("dora")
    assert method.settings.use_dora and method.name == "dora"
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    args = ["pretrain", "--out", run, "--data", corpus, *TINY, "--steps", 2, "--method", "dora", "--lora-r", 2]
    assert main([str(a) for a in args]) == 0
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    assert "exported the DoRA adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 2
    assert main(["export", str(run), "--merged", "--to", str(tmp_path / "merged")]) == 0
    assert main(["sample", str(tmp_path / "merged"), "--tokens", "2", "--prompt", "line"]) == 0
