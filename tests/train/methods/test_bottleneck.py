"""Houlsby and Pfeiffer as methods of the loop: adapter-only checkpoints over a recorded base, read back exactly,
the CLI's pretrain / sample / export --adapter, and export --merged refused in one sentence."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.models.pretrained import load_pretrained_model
from tinygraft.peft.bottleneck import BottleneckConfig, bottleneck_layers
from tinygraft.train import runs
from tinygraft.train.methods import make_method
from tinygraft.train.methods.bottleneck import Houlsby, Pfeiffer

from ...cli.tiny_runs import TINY, write_corpus
from .test_lora import base_dir, cfg, ids, logits, run_lora  # noqa: F401 (base_dir)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cls,wrapped", [(Houlsby, ("attn.c_proj", "mlp.c_proj")), (Pfeiffer, ("mlp.c_proj",))])
def test_checkpoint_holds_the_adapters_and_reads_back(cls, wrapped, base_dir, tmp_path):  # noqa: F811
    job, _ = run_lora(base_dir, tmp_path / "run", cfg(), cls(BottleneckConfig(adapter_reduction=8), base=base_dir))
    step = checkpoint.resolve(tmp_path / "run")
    paths = [p for p, _ in bottleneck_layers(job.model)]
    assert paths == [f"transformer.h.{i}.{m}" for i in range(2) for m in wrapped]
    tensors = load_file(step / "model.safetensors")
    assert sorted(tensors) == sorted(f"{p}.adapter_{w}.{t}" for p in paths for w in ("down", "up")
                                     for t in ("weight", "bias"))  # fmt: skip
    fresh = dict(load_pretrained_model(base_dir, "gpt").named_parameters())
    for name, p in job.model.named_parameters():
        if ".adapter_" not in name:
            assert not p.requires_grad and torch.equal(p, fresh[name.replace(".base.", ".")]), name
    again, method, _ = runs.adapted_model(step, checkpoint.load(step).model, build=None)
    assert type(method) is cls and method.settings.adapter_reduction == 8
    x = ids()
    torch.testing.assert_close(logits(again.eval(), x), logits(job.model.eval(), x), rtol=0, atol=0)


def test_cli_pretrains_samples_exports_and_refuses_to_merge(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    args = ["pretrain", "--out", run, "--data", corpus, *TINY, "--steps", 2, "--method", "houlsby",
            "--adapter-reduction", 4, "--adapter-act", "gelu"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert main(["sample", str(run), "--tokens", "3", "--prompt", "line"]) == 0
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    assert "exported the Houlsby adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["variant"], config["reduction"], config["non_linearity"]) == ("houlsby", 4, "gelu")
    assert main(["info", str(run)]) == 0
    weights = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("weights"))
    assert weights.endswith(" in the checkpoint")  # built from a preset: no base file to set it beside
    assert main(["export", str(run), "--merged", "--to", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "do not merge into the base weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()
    assert make_method("pfeiffer").default_lr == 1e-3 and make_method("houlsby").settings == BottleneckConfig()
