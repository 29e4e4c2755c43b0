"""`finetune --adapt-first N`: N language-model steps on the task's own text before fine-tuning, in a run of their
own (RUN/adapt-first) that lowers the held-out LM loss; the fine-tuning starts from exactly the adapted backbone;
a fine-tuning stopped after the phase resumes without repeating it. `finetune --watch TEXT`: a GPT's LM loss on the
text, a BERT's feature CKA with the starting model (1 at the start, exactly 1 while the backbone stays frozen)."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.tiny_runs import run_cli
from tests.train.finetune_fixtures import make_env
from tinygraft.core import checkpoint
from tinygraft.train import adapt_first

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("adapt"))


def args(env, out, model="bert", *extra, adapt=True):
    first = ("--adapt-first", 6, "--adapt-lr", 3e-3) if adapt else ()
    return ["finetune", "--from", env[model], "--out", out, "--train", env["train"], "--val", env["val"], "--steps", 4,
            "--batch-size", 8, "--max-length", 32, *first, *extra]  # fmt: skip


def weights(run_dir, prefix):
    tensors = load_file(str(checkpoint.resolve(run_dir, "latest") / "model.safetensors"))
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("model, lm_prefix", [("bert", "bert."), ("gpt", "")])
def test_the_fine_tuning_starts_from_the_adapted_backbone(env, tmp_path, capsys, model, lm_prefix):
    out = tmp_path / "run"
    code, _, err = run_cli(args(env, out, model, "--method", "linear-probe"), capsys)  # the backbone stays put
    assert code == 0, err
    phase = json.loads((out / "adapt-first" / "results.json").read_text())
    assert phase["step"] == 6 and phase["metrics"]["loss"] < phase["before"]["loss"]
    results = json.loads((out / "results.json").read_text())
    assert results["adapt_first"]["after"]["loss"] == phase["metrics"]["loss"]
    adapted = weights(out / "adapt-first", lm_prefix)
    tuned = weights(out, "backbone.")
    shared = [k for k in tuned if k in adapted]
    assert len(shared) >= len(tuned) - 2  # all but a pooler the LM never had
    assert all(torch.equal(tuned[k], adapted[k]) for k in shared)
    assert not any(k.startswith("cls.") for k in tuned)  # the masked-LM head stays in the phase's run


def test_a_fine_tuning_stopped_after_the_phase_resumes_without_repeating_it(env, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(args(env, straight), capsys)[0] == 0
    assert run_cli(args(env, split), capsys)[0] == 0
    for name in ("checkpoints", "results.json", "metrics.jsonl"):  # as if stopped between the phase and step 1
        target = split / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    phase_log = (split / "adapt-first" / "metrics.jsonl").read_text()
    torch.manual_seed(5)
    code, _, err = run_cli(["finetune", "--out", split, "--resume"], capsys)
    assert code == 0, err
    assert "--adapt-first:" not in err and (split / "adapt-first" / "metrics.jsonl").read_text() == phase_log
    a, b = weights(straight, ""), weights(split, "")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_first_refusals(env, tmp_path, capsys):
    code, _, err = run_cli(args(env, tmp_path / "r", "bert", "--adapt-first", -1), capsys)
    assert code == 2 and "--adapt-first must be" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("model, measure", [("bert", "cka"), ("gpt", "loss")])
def test_watch_reports_a_gpts_lm_loss_and_a_berts_feature_drift(env, tmp_path, capsys, model, measure):
    text = tmp_path / "other.txt"
    text.write_text("".join(f"an unrelated line of text, number {i}, about ships and the sea.\n" for i in range(400)))
    runs = {}
    for method in ("full", "linear-probe"):
        out = tmp_path / method
        extra = ("--method", method, "--lr", 1e-2, "--watch", text)
        code, _, err = run_cli(args(env, out, model, *extra, adapt=False), capsys)
        assert code == 0, err
        runs[method] = json.loads((out / "results.json").read_text())
    for method, r in runs.items():
        f = r["forgetting"]
        assert f["measure"] == {"other": measure} and f["watched"] == {"other": str(text)}
        before, after = f["before"]["watch:other"], r["metrics"]["watch:other"]
        if measure == "cka":
            assert before == pytest.approx(1.0, abs=1e-9)
        if method == "linear-probe":  # the backbone never moves: the same number as at the start
            assert after == pytest.approx(before, abs=1e-6)
        else:
            assert after != pytest.approx(before, abs=1e-6)
    code, out, err = run_cli(["forgetting", tmp_path / "full", tmp_path / "linear-probe"], capsys)
    assert code == 0 and "| linear-probe |" in out, err


def test_ctrl_c_in_the_phase_saves_it_and_resume_finishes_it_then_fine_tunes(env, tmp_path, capsys, monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(args(env, straight), capsys)[0] == 0

    class CtrlCAtStep3:  # the phase's training batches; the first Ctrl-C lets the loop finish the step and save
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def next(self):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return self.inner.next()

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    real_job = adapt_first.Job
    monkeypatch.setattr(adapt_first, "Job", lambda **kw: real_job(**{**kw, "batcher": CtrlCAtStep3(kw["batcher"])}))
    code, _, err = run_cli(args(env, split), capsys)
    assert code == 130 and not (split / "checkpoints").exists(), err
    phase = split / "adapt-first"
    assert checkpoint.load(phase).step == 3
    assert (json.loads((phase / "results.json").read_text()) if (phase / "results.json").exists() else {}).get(
        "status"
    ) != "completed"
    monkeypatch.setattr(adapt_first, "Job", real_job)
    code, _, err = run_cli(["finetune", "--out", split, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((split / "adapt-first" / "results.json").read_text())["status"] == "completed"
    a, b = weights(straight, ""), weights(split, "")
    assert all(torch.equal(a[k], b[k]) for k in a)
