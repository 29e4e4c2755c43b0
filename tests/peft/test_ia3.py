"""IA3Linear, add_ia3 / merge / unmerge, save and reload, and peft's IA3 file layout, against transformers + peft."""

import copy

import pytest
import torch
import torch.nn as nn

from tinygraft.errors import TinygraftError
from tinygraft.models import GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.peft.adapters import adapter_parameters, adapters_disabled, merge_adapter, unload, unmerge_adapter
from tinygraft.peft.files import CONFIG_NAME, adapter_config, load_adapter, read_adapter_config, save_adapter
from tinygraft.peft.ia3 import IA3Linear, add_ia3, ia3_layers

from .test_lora import output, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft", reason="peft is the reference IA3 implementation (pip install .[dev])")


def randomize(model, adapter="default"):
    """Vectors start at one; move them so the adapter changes the output."""
    for _, layer in ia3_layers(model):
        nn.init.normal_(layer.ia3_l[adapter], mean=1.0, std=0.3)


def our_gpt():
    return GPT(GPTConfig(vocab_size=99, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


def our_bert():
    cfg = BERTConfig(vocab_size=99, max_position_embeddings=16, n_layer=2, n_head=2, n_embd=32, intermediate_size=37,
                     dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return BERTForMaskedLM(cfg).eval()


def _ours(model, ids, mask):
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(ids)[0]
        return model(ids, attention_mask=mask)[0]


@pytest.mark.parametrize("build", [our_gpt, our_bert])
def test_starts_as_the_base_and_trains_only_its_vectors(build):
    torch.manual_seed(0)
    model = build()
    ids, mask = torch.randint(0, 99, (3, 9)), torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False  # padding
    before = _ours(model, ids, mask)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    n = add_ia3(model)
    paths = [p for p, _ in ia3_layers(model)]
    if build is our_gpt:
        assert paths == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")]
        assert n == 2 * (3 * 32 + 4 * 32)  # c_attn's outputs, the MLP's inner width
    else:
        layers = ("attention.self.key", "attention.self.value", "output.dense")
        assert [p.split("layer.")[1] for p in paths] == [f"{i}.{m}" for i in range(2) for m in layers]
        assert n == 2 * (32 + 32 + 37)
    assert torch.equal(_ours(model, ids, mask), before)  # every vector is one
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)  # steps of ~lr, any grad
    for _ in range(3):
        loss = (model(ids)[0] if build is our_gpt else model(ids, attention_mask=mask)[0]).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "ia3_l" not in k}
    assert trained.keys() == base_state.keys()
    assert all(torch.equal(trained[k], base_state[k]) for k in base_state)  # the base, bit for bit
    assert all(not torch.equal(p, torch.ones_like(p)) for p in adapter_parameters(model))
    model.eval()
    assert not torch.allclose(_ours(model, ids, mask), before)
    with adapters_disabled(model):
        assert torch.equal(_ours(model, ids, mask), before)


def test_forward_reads_as_the_math():
    torch.manual_seed(1)
    base = nn.Linear(5, 4)
    x = torch.randn(3, 5)
    out, inp = IA3Linear(copy.deepcopy(base), feedforward=False), IA3Linear(copy.deepcopy(base), feedforward=True)
    for layer in (out, inp):
        layer.add_adapter("default", None)
        layer.set_adapter("default")
    nn.init.normal_(out.ia3_l["default"]), nn.init.normal_(inp.ia3_l["default"])
    assert out.ia3_l["default"].shape == (4, 1) and inp.ia3_l["default"].shape == (1, 5)  # peft's shapes
    torch.testing.assert_close(out(x), base(x) * out.ia3_l["default"].flatten())
    torch.testing.assert_close(inp(x), base(x * inp.ia3_l["default"].flatten()))


@pytest.mark.parametrize("build", [tiny_gpt2, our_gpt, tiny_bert])
def test_merged_equals_unmerged_and_unmerge_restores_the_base(build):
    model = build().double()
    add_ia3(model)
    randomize(model)
    ids = torch.randint(0, 99, (2, 7))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    run = (lambda: _ours(model, ids, None)) if build is our_gpt else (lambda: output(model, ids))  # noqa: E731
    unmerged = run()
    merge_adapter(model)
    torch.testing.assert_close(run(), unmerged, rtol=1e-12, atol=1e-12)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all(".base." in k for k in changed)  # the base weights (and biases) took the vectors
    unmerge_adapter(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=1e-12, atol=1e-12)
    unload(model, merge=True)
    assert not list(ia3_layers(model))
    torch.testing.assert_close(run(), unmerged, rtol=1e-12, atol=1e-12)


def test_saved_and_reloaded_gives_the_same_outputs(tmp_path):
    model = our_bert()
    add_ia3(model)
    randomize(model)
    ids, mask = torch.randint(0, 99, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    save_adapter(model, tmp_path)
    config = read_adapter_config(tmp_path)
    assert config["peft_type"] == "IA3" and all(p.endswith("output.dense") for p in config["feedforward_modules"])
    fresh = our_bert()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "ia3_l" not in k})
    assert load_adapter(fresh, tmp_path) == sum(p.numel() for p in adapter_parameters(model))
    assert torch.equal(_ours(fresh, ids, mask), _ours(model, ids, mask))


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_adapter_saved_here_loads_in_peft(build, tmp_path):
    base = build()
    ours = copy.deepcopy(base)
    add_ia3(ours)
    randomize(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, 99, (2, 7))
    assert not torch.allclose(output(ours, ids), output(base, ids))
    torch.testing.assert_close(output(theirs, ids), output(ours, ids))


@pytest.mark.parametrize("build,targets,feedforward", [
    (tiny_bert, ["key", "value", "output.dense"], ["output.dense"]),  # peft's BERT default
    (tiny_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
])  # fmt: skip
def test_peft_adapter_loads_here(build, targets, feedforward, tmp_path):
    base = build()
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    assert load_adapter(ours, tmp_path) == theirs.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 99, (2, 7))
    torch.testing.assert_close(output(ours, ids), output(theirs.eval(), ids))
    assert adapter_config(ours)["peft_type"] == "IA3"


def test_bad_settings_are_one_sentence(tmp_path):
    with pytest.raises(TinygraftError, match="not among the targets"):
        add_ia3(our_bert(), ["key", "value"], ["output.dense"])
    with pytest.raises(TinygraftError, match="give both --ia3-targets and --ia3-feedforward"):
        add_ia3(our_bert(), ["key"], "auto")
    with pytest.raises(TinygraftError, match="knows BERT and GPT-2 module names"):
        add_ia3(nn.Sequential(nn.Linear(4, 4)))
    model = our_bert()
    add_ia3(model)
    save_adapter(model, tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(text.replace('"modules_to_save": null', '"modules_to_save": ["cls"]'))
    with pytest.raises(TinygraftError, match="modules_to_save"):
        read_adapter_config(tmp_path)
