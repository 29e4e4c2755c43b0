"""`finetune --train NAME=FILE --val NAME=FILE ...`: one adapter and head per name, trained together in mixed batches;
per-name results, checkpoints holding every adapter, `predict/embed/export --adapter-name`, and the bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.finetune_fixtures import demo_rows, make_bert_dir, write_tsv
from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError
from tinygraft.models.pretrained import load_pretrained
from tinygraft.train import multi, runs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    train, val = demo_rows()
    two = [r for r in train if r[1] in ("logging", "asyncio")][:40]  # a 2-class task
    three = [r for r in train if r[1] in ("xml", "email", "unittest")][:30]  # a 3-class one, same columns
    files = {
        "a_train": write_tsv(root / "a.tsv", ["text", "label"], two),
        "a_val": write_tsv(
            root / "a_val.tsv", ["text", "label"], [r for r in val if r[1] in ("logging", "asyncio")][:16]
        ),
        "b_train": write_tsv(root / "b.tsv", ["text", "label"], three),
        "b_val": write_tsv(
            root / "b_val.tsv", ["text", "label"], [r for r in val if r[1] in ("xml", "email", "unittest")][:12]
        ),
    }
    return {"root": root, "bert": make_bert_dir(root, [t for t, _ in train] * 2), **files}


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def named(env):
    return ["--train", f"pos={env['a_train']}", "--val", f"pos={env['a_val']}",
            "--train", f"topic={env['b_train']}", "--val", f"topic={env['b_val']}"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("runs") / "multi"
    args = ["finetune", "--from", env["bert"], "--out", out, "--steps", 6, "--batch-size", 8, "--max-length", 32,
            "--eval-every", 3, "--method", "lora", "--lora-r", 2, *named(env)]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return out


def test_one_run_trains_an_adapter_and_a_head_per_name(trained, env):
    r = json.loads((trained / "results.json").read_text())
    assert set(r["per_adapter"]) == {"pos", "topic"}
    per = r["per_adapter"]
    assert r["metrics"]["accuracy"] == pytest.approx((per["pos"]["accuracy"] + per["topic"]["accuracy"]) / 2)
    assert r["n_train"] == 70
    saved = load_file(str(checkpoint.resolve(trained) / "model.safetensors"))
    assert {k.split(".")[1] for k in saved} == {"pos", "topic"}
    assert saved["heads.pos.classifier.weight"].shape[0] == 2 and saved["heads.topic.classifier.weight"].shape[0] == 3
    base = load_pretrained(env["bert"]).model.state_dict()
    assert not any(k.split(".", 2)[2].removeprefix("backbone.") in base for k in saved if k.startswith("adapters."))
    config = json.loads((trained / "config.json").read_text())
    assert config["adapters"] == ["pos", "topic"] and set(config["labels"]) == {"pos", "topic"}


def test_info_lists_the_adapters(trained, capsys):
    code, out, err = run(["info", trained], capsys)
    assert code == 0 and "adapters     pos, topic" in out, err


def test_each_adapter_loads_alone_and_equals_its_rows_in_a_mixed_batch(trained):
    one = runs.load(trained, adapter="pos").model
    other = runs.load(trained, adapter="topic").model
    ids = torch.randint(5, 100, (4, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a, b = one(batch)[0]["logits"], other(batch)[0]["logits"]
    assert a.shape == (4, 2) and b.shape == (4, 3)
    with pytest.raises(TinygraftError, match=r"holds 2 adapters \(pos, topic\); choose one with --adapter-name"):
        runs.load(trained)
    with pytest.raises(TinygraftError, match="has no adapter named 'zz'"):
        runs.load(trained, adapter="zz")


def test_predict_embed_and_export_take_the_adapter_name(trained, env, tmp_path, capsys):
    code, out, err = run(["predict", trained, "--adapter-name", "topic", "--input", env["b_val"]], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"xml", "email", "unittest"}
    code, out, err = run(["predict", trained, "--input", env["b_val"]], capsys)
    assert code == 2 and "choose one with --adapter-name" in err
    (tmp_path / "t.txt").write_text("Return the logger.\n")
    code, out, err = run(["embed", "--from", trained, "--adapter-name", "pos", "--input", tmp_path / "t.txt"], capsys)
    assert code == 0 and len(json.loads(out.splitlines()[0])["embedding"]) == 32, err
    code, out, err = run(["export", trained, "--adapter-name", "pos", "--adapter", tmp_path / "ad"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2


def test_bad_named_files_are_one_sentence(env, tmp_path, capsys):
    with pytest.raises(TinygraftError, match="--train pos=... is given twice"):
        multi.named_files([f"pos={env['a_train']}", f"pos={env['b_train']}"], "--train")
    with pytest.raises(TinygraftError, match="has no name; with several adapters each --train is NAME=FILE"):
        multi.named_files([f"pos={env['a_train']}", str(env["b_train"])], "--train")
    with pytest.raises(TinygraftError, match="--train is given 2 times"):
        multi.named_files([str(env["a_train"]), str(env["b_train"])], "--train")
    assert multi.named_files(str(env["a_train"]), "--train") is None
    with pytest.raises(TinygraftError, match="name different adapters"):
        multi.pair_up({"a": "x", "b": "y"}, {"a": "x"})
    base = ["finetune", "--from", env["bert"], "--out", tmp_path / "r", "--steps", 1, "--max-length", 16]
    code, _, err = run([*base, "--method", "full", *named(env)], capsys)
    assert code == 2 and "not an adapter method" in err
    twice = ["--train", f"pos={env['a_train']}", "--train", f"pos={env['b_train']}"]
    code, _, err = run([*base, "--method", "lora", *twice], capsys)
    assert code == 2 and "given twice" in err
    code, _, err = run(["predict", tmp_path / "nothing", "--adapter-name", "x", "--input", env["a_val"]], capsys)
    assert code == 2


def test_a_multi_adapter_run_resumes_exactly_and_with_activation_checkpointing(env, tmp_path):
    common = ["finetune", "--from", env["bert"], "--steps", 4, "--batch-size", 8, "--max-length", 32, "--eval-every",
              2, "--method", "ia3", *named(env)]  # fmt: skip
    assert main([str(a) for a in [*common, "--out", tmp_path / "whole"]]) == 0
    assert main([str(a) for a in [*common, "--out", tmp_path / "part", "--stop-at", 2]]) == 0
    again = ["finetune", "--out", tmp_path / "part", "--resume", "--set", "train.activation_checkpointing=true"]
    assert main([str(a) for a in again]) == 0
    whole, part = (load_file(str(checkpoint.resolve(tmp_path / d) / "model.safetensors")) for d in ("whole", "part"))
    assert whole.keys() == part.keys()
    for k in whole:
        torch.testing.assert_close(part[k], whole[k], rtol=1e-5, atol=1e-6)
