"""IA3 as a method of the loop: vector-only checkpoints over a recorded base, the frozen base, a task model's head,
export merged and in peft's IA3 layout (checked with peft on transformers' GPT-2 of the same base), and the CLI."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.infer.export import export_adapter, export_run
from tinygraft.models.bert import BERT
from tinygraft.models.pretrained import load_pretrained_model
from tinygraft.peft.ia3 import IA3Config, ia3_layers
from tinygraft.train import runs
from tinygraft.train.methods import make_method
from tinygraft.train.methods.ia3 import IA3Method

from ...cli.tiny_runs import TINY, write_corpus
from .test_lora import BERT_CFG, base_dir, cfg, ids, logits, run_lora, tiny_bert_task  # noqa: F401 (base_dir)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "ia3"
    job, outcome = run_lora(base_dir, out, cfg(), IA3Method(IA3Config(), base=base_dir))
    return SimpleNamespace(out=out, job=job, outcome=outcome)


def test_checkpoint_holds_the_vectors_and_the_base_stays_bit_identical(trained, base_dir):  # noqa: F811
    step = checkpoint.resolve(trained.out)
    tensors = load_file(step / "model.safetensors")
    wrapped = [path for path, _ in ia3_layers(trained.job.model)]
    assert wrapped == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")]
    assert sorted(tensors) == sorted(f"{p}.ia3_l" for p in wrapped)
    results = json.loads((trained.out / "results.json").read_text())
    assert results["method"] == "ia3" and results["trainable_params"] == 2 * (3 * 32 + 4 * 32)
    fresh = dict(load_pretrained_model(base_dir, "gpt").named_parameters())
    for name, p in trained.job.model.named_parameters():
        if ".ia3_l." in name:
            assert not torch.equal(p, torch.ones_like(p)), name  # it trained
        else:
            assert not p.requires_grad and torch.equal(p, fresh[name.replace(".base.", ".")]), name
    again, method, _ = runs.adapted_model(step, checkpoint.load(step).model, build=None)
    assert isinstance(method, IA3Method)
    x = ids()
    torch.testing.assert_close(logits(again.eval(), x), logits(trained.job.model.eval(), x), rtol=0, atol=0)


def test_exports_merged_and_for_peft_agree(trained, base_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
    peft = pytest.importorskip("peft", reason="peft is the reference IA3 implementation (dev extra)")
    done = export_run(trained.out, tmp_path / "merged", merged=True)
    assert "IA3 adapters merged into the base weights" in done["notes"]
    assert export_adapter(trained.out, tmp_path / "adapter")["method"] == "IA3"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"]
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval(),
                                            tmp_path / "adapter").eval()  # fmt: skip
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    x = ids()
    ours = logits(trained.job.model.eval(), x)
    torch.testing.assert_close(logits(theirs, x), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(merged, x), ours, rtol=1e-4, atol=1e-5)


def test_task_model_trains_its_head_and_the_vectors(tmp_path):
    torch.manual_seed(5)
    BERT(BERT_CFG).save_pretrained(tmp_path / "bert")
    method = IA3Method(IA3Config(), base=tmp_path / "bert")
    model = method.attach(tiny_bert_task(tmp_path / "bert"))
    groups = method.param_groups(model)
    assert [g["name"] for g in groups] == ["ia3", "head"]
    state = method.state_dict(model)
    assert sorted(k for k in state if not k.startswith("head.")) == [
        f"backbone.encoder.layer.0.{m}.ia3_l" for m in ("attention.self.key", "attention.self.value", "output.dense")
    ]
    again = IA3Method(IA3Config(), base=tmp_path / "bert")
    other = again.attach(tiny_bert_task(tmp_path / "bert"))
    assert again.load_state_dict(other, state) == []
    files = again.extra_files(other)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "IA3"


def test_cli_pretrains_samples_and_exports_with_ia3(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    assert main([str(a) for a in ["pretrain", "--out", run, "--data", corpus, *TINY, "--steps", 2, "--method",
                                  "ia3"]]) == 0  # fmt: skip
    assert main(["sample", str(run), "--tokens", "3", "--prompt", "line"]) == 0
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    assert "exported the IA3 adapter" in capsys.readouterr().out
    method = make_method("ia3", {"ia3_targets": "key,value,output.dense", "ia3_feedforward": "output.dense"})
    assert method.settings == IA3Config("key,value,output.dense", "output.dense") and method.default_lr == 3e-3
