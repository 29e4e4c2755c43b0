"""Prompt and prefix tuning as methods of the loop: prompt-only checkpoints over a recorded base, the frozen base,
export for peft (checked with peft on transformers' GPT-2 of the same base), a task model's head, and the CLI."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError
from tinygraft.infer.export import export_adapter
from tinygraft.models.bert import BERT
from tinygraft.models.pretrained import load_pretrained_model
from tinygraft.peft.prompt import PrefixConfig, PromptConfig
from tinygraft.train import runs
from tinygraft.train.methods import make_method
from tinygraft.train.methods.prompt import PrefixTuning, PromptTuning

from ...cli.tiny_runs import TINY, write_corpus
from .test_lora import BERT_CFG, base_dir, cfg, ids, logits, run_lora, tiny_bert_task  # noqa: F401 (base_dir)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["prompt", "prefix"])
def trained(request, base_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / request.param
    if request.param == "prompt":
        method = PromptTuning(PromptConfig(4), base=base_dir)
    else:
        method = PrefixTuning(PrefixConfig(4, prefix_projection=True, prefix_hidden=16, prefix_positions="after"),
                              base=base_dir)  # fmt: skip
    job, outcome = run_lora(base_dir, out, cfg(), method)
    return SimpleNamespace(out=out, job=job, outcome=outcome, kind=request.param)


def test_checkpoint_holds_the_prompt_and_the_base_stays_bit_identical(trained, base_dir):  # noqa: F811
    step = checkpoint.resolve(trained.out)
    tensors = load_file(step / "model.safetensors")
    expected = {"transformer.wte.prompt_embeddings"}
    if trained.kind == "prefix":  # the MLP is kept so training resumes; exported files fold it
        expected |= {f"transformer.wte.prefix_mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert set(tensors) == expected
    fresh = dict(load_pretrained_model(base_dir, "gpt").named_parameters())
    for name, p in trained.job.model.named_parameters():
        if ".prompt_embeddings." not in name and ".prefix_mlp." not in name:
            assert not p.requires_grad and torch.equal(p, fresh[name.replace(".base.", ".")]), name
    again, method, _ = runs.adapted_model(step, checkpoint.load(step).model, build=None)
    assert isinstance(method, PromptTuning if trained.kind == "prompt" else PrefixTuning)
    x = ids()
    torch.testing.assert_close(logits(again.eval(), x), logits(trained.job.model.eval(), x), rtol=0, atol=0)


def test_the_exported_adapter_gives_peft_our_outputs(trained, base_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
    peft = pytest.importorskip("peft", reason="peft is the reference implementation (dev extra)")
    assert export_adapter(trained.out, tmp_path / "adapter")["method"] in ("prompt tuning", "prefix tuning")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config.get("prefix_projection") in (None, False)
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval(),
                                            tmp_path / "adapter").eval()  # fmt: skip
    x = ids()
    ours = logits(trained.job.model.eval(), x)
    torch.testing.assert_close(logits(theirs, x)[:, -x.shape[1] :], ours, rtol=1e-4, atol=1e-5)


def test_a_prefix_with_no_positions_is_refused_for_peft(base_dir, tmp_path):  # noqa: F811
    run_lora(base_dir, tmp_path / "run", cfg(steps=1), PrefixTuning(PrefixConfig(3), base=base_dir))
    with pytest.raises(TinygraftError, match="--prefix-positions none, which peft cannot compute"):
        export_adapter(tmp_path / "run", tmp_path / "adapter")


@pytest.mark.parametrize("cls,config", [(PromptTuning, PromptConfig(3)), (PrefixTuning, PrefixConfig(3))])
def test_task_model_trains_its_head_and_the_prompt(cls, config, tmp_path):
    torch.manual_seed(5)
    BERT(BERT_CFG).save_pretrained(tmp_path / "bert")
    method = cls(config, base=tmp_path / "bert")
    model = method.attach(tiny_bert_task(tmp_path / "bert"))
    assert [g["name"] for g in method.param_groups(model)] == [cls.name, "head"]
    state = method.state_dict(model)
    assert sorted(k for k in state if not k.startswith("head.")) == [
        "backbone.embeddings.word_embeddings.prompt_embeddings"
    ]
    again = cls(config, base=tmp_path / "bert")
    other = again.attach(tiny_bert_task(tmp_path / "bert"))
    assert again.load_state_dict(other, state) == []
    batch = {"input_ids": torch.randint(1, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    torch.testing.assert_close(other.eval()(batch)[0]["logits"], model.eval()(batch)[0]["logits"])


def test_cli_pretrains_samples_and_exports_with_prompt_tuning(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    assert main([str(a) for a in ["pretrain", "--out", run, "--data", corpus, *TINY, "--steps", 2, "--method",
                                  "prompt-tuning", "--num-virtual-tokens", 4]]) == 0  # fmt: skip
    assert main(["sample", str(run), "--tokens", "3", "--prompt", "line"]) == 0
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    assert "exported the prompt tuning adapter" in capsys.readouterr().out
    method = make_method("prefix-tuning", {"num_virtual_tokens": 5, "prefix_positions": "after"})
    assert method.settings == PrefixConfig(5, prefix_positions="after") and method.default_lr == 1e-2
    assert make_method("prompt-tuning").default_lr == 3e-2
