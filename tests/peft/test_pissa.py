"""PiSSA (`lora_init="pissa"`): A and B from W's principal singular vectors, the base keeping the residual, the
model unchanged at the start; saved as a plain rank-2r LoRA adapter of the original base, which ours and peft
(on transformers' BertModel and GPT2LMHeadModel) load to the trained model's outputs; the loop's checkpoints."""

import copy
import json

import pytest
import torch

from tinygraft.cli.main import main
from tinygraft.errors import TinygraftError
from tinygraft.peft.adapters import delete_adapter
from tinygraft.peft.files import CONFIG_NAME, load_adapter, save_adapter
from tinygraft.peft.lora import add_lora, lora_layers
from tinygraft.train import runs

from ..cli.tiny_runs import TINY, write_corpus
from .test_lora import output, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft", reason="peft is the reference PiSSA implementation (pip install .[dev])")


def _train(model):
    """A stand-in for training: move every A and B a little."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                t.add_(torch.randn_like(t) * 0.05)


def test_starts_as_the_base_from_the_principal_components():
    torch.manual_seed(0)
    base = tiny_bert().double()
    model = copy.deepcopy(base)
    add_lora(model, ["query"], r=3, alpha=6, lora_init="pissa")
    ids = torch.randint(0, 99, (2, 7))
    torch.testing.assert_close(output(model, ids), output(base, ids), rtol=1e-12, atol=1e-12)
    layer = model.encoder.layer[0].attention.self.query
    w = base.encoder.layer[0].attention.self.query.weight
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    principal = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    s = layer.settings["default"].scaling
    torch.testing.assert_close(s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight, principal)
    torch.testing.assert_close(layer.base.weight, w - principal)  # the residual
    delete_adapter(model, "default")
    torch.testing.assert_close(layer.base.weight, w, rtol=1e-12, atol=1e-12)  # the base back whole


@pytest.mark.parametrize("build,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, "all-linear")])
def test_saved_as_rank_2r_over_the_original_base(build, targets, tmp_path):
    torch.manual_seed(1)
    base = build()
    model = copy.deepcopy(base)
    add_lora(model, targets, r=4, alpha=8, lora_init="pissa")
    _train(model)
    ids = torch.randint(0, 99, (2, 7))
    want = output(model, ids)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(output(ours, ids), want, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output(theirs, ids), want, rtol=1e-5, atol=1e-5)
    assert (output(base, ids) - want).abs().max() > 1e-3


def test_refusals_are_one_sentence(tmp_path):
    with pytest.raises(TinygraftError, match="does not combine with DoRA"):
        add_lora(tiny_bert(), ["query"], use_dora=True, lora_init="pissa")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path)  # unconverted: it adapts peft's residual base
    with pytest.raises(TinygraftError, match="saved without converting it"):
        load_adapter(tiny_bert(), tmp_path)


def test_a_pissa_run_reads_back_and_exports(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    args = ["pretrain", "--out", run, "--data", corpus, *TINY, "--steps", 2, "--method", "lora", "--lora-init", "pissa",
            "--lora-r", 2]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    loaded = runs.load(run, None, device=torch.device("cpu"))
    assert loaded.method.settings.lora_init == "pissa"
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["r"] == 4 and config["init_lora_weights"] is True
    assert main(["export", str(run), "--merged", "--to", str(tmp_path / "merged")]) == 0
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want = loaded.model.eval()(x)[0]
        merged = runs.load(tmp_path / "merged", None, device=torch.device("cpu")).model.eval()(x)[0]
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
