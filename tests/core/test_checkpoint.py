"""Checkpoint directories: round trip, pointers, keep-K, crash safety, and corrupt or incomplete input."""

import json
import os

import pytest
import torch

from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(root, step, model, opt, **kw):
    return checkpoint.save(
        root,
        step,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        trainer_state={"tokens_seen": step * 10, "data": {"seed": 1, "step": step}},
        config={"train": {"steps": 100}},
        tokenizer_json='{"model": {}}',
        **kw,
    )


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 3, model, opt, extra_files={"adapter_config.json": "{}"})
    assert path.name == "step-00000003" and (path / "adapter_config.json").is_file()
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.step == 3 and ckpt.trainer_state["tokens_seen"] == 30 and ckpt.config == {"train": {"steps": 100}}
    assert ckpt.tokenizer_path == path / "tokenizer.json"
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model[k], v)

    model2 = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))
    model2.load_state_dict(ckpt.model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer)
    a, b = opt.state_dict(), opt2.state_dict()
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)
    x = torch.randn(4, 7)  # one more identical step on both gives identical weights
    for m, o in ((model, opt), (model2, opt2)):
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert checkpoint.optimizer_state_bytes(a) > 0


def test_pointers_and_keep(tmp_path):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt, best=True, keep=2)
    for step in (2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    assert (tmp_path / "best").read_text().strip() == "step-00000001"
    assert checkpoint.list_steps(tmp_path) == [1, 3, 4]  # the 2 newest and the best
    assert checkpoint.load(tmp_path, "best").step == 1
    assert checkpoint.resolve(tmp_path / "step-00000003") == tmp_path / "step-00000003"
    (tmp_path.parent / "run").mkdir()
    assert checkpoint.load(tmp_path / "step-00000003").step == 3


def test_crash_during_save_leaves_latest_complete(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("step-00000002"):
            raise OSError("simulated power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        _save(tmp_path, 2, model, opt)
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint.load(tmp_path).step == 1
    assert checkpoint.list_steps(tmp_path) == [1]  # the half-written temp dir is not a step


def test_resave_same_step_replaces_whole(tmp_path):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 5, model, opt)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _save(tmp_path, 5, model, opt)
    assert torch.equal(checkpoint.load(tmp_path).model["0.weight"], model[0].weight)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_model", "corrupt"),
        ("truncate_optimizer", "corrupt"),
        ("missing_model", "incomplete: model.safetensors is missing"),
        ("missing_optimizer", "incomplete: optimizer.safetensors is missing"),
        ("flip_config", "corrupt"),
        ("garbage_state", "not valid JSON"),
        ("latest_dangling", "names 'step-00000009', which does not exist"),
        ("no_latest", "holds no checkpoint"),
    ],
)
def test_corrupt_or_incomplete_checkpoint_is_one_sentence(tmp_path, damage, message):
    model, opt = _model_and_optimizer()
    step = _save(tmp_path, 1, model, opt)
    if damage.startswith("truncate"):
        f = step / ("model.safetensors" if damage.endswith("model") else "optimizer.safetensors")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage.startswith("missing"):
        (step / ("model.safetensors" if damage.endswith("model") else "optimizer.safetensors")).unlink()
    elif damage == "flip_config":
        cfg = json.loads((step / "config.json").read_text())
        cfg["train"]["steps"] = 101
        (step / "config.json").write_text(json.dumps(cfg))
    elif damage == "garbage_state":
        (step / "trainer_state.json").write_text("{not json")
    elif damage == "latest_dangling":
        (tmp_path / "latest").write_text("step-00000009\n")
    elif damage == "no_latest":
        (tmp_path / "latest").unlink()
    with pytest.raises(TinygraftError, match=message) as info:
        checkpoint.load(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.pop("files"), "records no sha256 of the checkpoint's files"),
        (lambda s: s.update(files="oops"), "records no sha256 of the checkpoint's files"),
        (lambda s: s.update(files={}), "records no sha256 of model.safetensors"),
        (lambda s: s["files"].pop("config.json"), "records no sha256 of config.json"),
        (lambda s: s.update(files={**s["files"], "../x": "0" * 64}), "names '../x', which is not a file"),
        (lambda s: s.pop("step"), "names no step"),
        (lambda s: s.update(step="3"), "names no step"),
    ],
)
def test_a_checkpoint_whose_files_cannot_be_checked_is_refused(tmp_path, change, message):
    """trainer_state.json vouches for every file by its sha256; one that does not (hand-edited, damaged) is refused
    in one sentence rather than trusted: unchecked weights would otherwise load without a word."""
    model, opt = _model_and_optimizer()
    step = _save(tmp_path, 1, model, opt)
    state = json.loads((step / "trainer_state.json").read_text())
    change(state)
    (step / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(TinygraftError, match=message) as info:
        checkpoint.load(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00", b"../../elsewhere/step-00000001\n", b"model.safetensors\n"])
def test_a_pointer_that_names_no_step_directory_beside_it_is_refused(tmp_path, pointer):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    (tmp_path / "latest").write_bytes(pointer)
    with pytest.raises(TinygraftError, match="should name a step directory beside it"):
        checkpoint.load(tmp_path)


def test_missing_path():
    with pytest.raises(TinygraftError, match="does not exist"):
        checkpoint.load("/nonexistent/run")
