"""One process per run directory: a second job on a run in use gets one sentence naming the holder, a dead holder's
lock is free, and what a process that died while saving left in checkpoints/ is cleaned away."""

import subprocess
import sys

import pytest

from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.train.run_dir import RunDir

TINY = ["--preset", "gpt-tiny", "--steps", 2, "--set", "model.n_head=2", "--set", "model.n_layer=1", "--set",
        "model.n_embd=32", "--set", "data.vocab_size=300", "--set", "train.seq_len=16", "--set",
        "train.batch_size=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set",
        "train.warmup_steps=1"]  # fmt: skip
HOLD = "import sys, time; from tinygraft.train.run_dir import RunDir; r = RunDir(sys.argv[1]); r.lock(); print('held', flush=True); time.sleep(120)"  # noqa: E501


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: a small corpus for a tiny model, read twice.\n" for i in range(300)))
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_a_run_in_use_is_refused_naming_the_holder_and_a_dead_holder_frees_it(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run(["pretrain", "--out", out, "--data", corpus, *TINY, "--stop-at", 1], capsys)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["pretrain", "--out", out, "--resume"],
                     ["pretrain", "--out", out, "--overwrite", "--data", corpus, *TINY],
                     ["finetune", "--out", out, "--resume"]):  # fmt: skip
            code, err = run(args, capsys)
            assert code == 2 and f"another tinygraft process (pid {holder.pid}) is using" in err, (args, err)
            assert err.count("\n") == 1
        assert checkpoint.load(out).step == 1  # untouched
    finally:
        holder.kill()
        holder.wait()
    code, err = run(["pretrain", "--out", out, "--resume"], capsys)  # the dead process's lock is free
    assert code == 0, err
    code, err = run(["pretrain", "--out", out, "--resume"], capsys)  # and this process let go of it when it ended
    assert code == 2 and "already finished" in err


def test_leftovers_of_a_process_that_died_while_saving_are_removed(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run(["pretrain", "--out", out, "--data", corpus, *TINY, "--stop-at", 1], capsys)[0] == 0
    stale = [out / "checkpoints" / ".tmp-step-00000002-99999", out / "checkpoints" / ".old-step-00000001-99999"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    assert run(["pretrain", "--out", out, "--resume"], capsys)[0] == 0
    assert not any(d.exists() for d in stale) and checkpoint.load(out).step == 2


def test_the_lock_is_on_the_directory_and_released_by_the_job(tmp_path):
    with RunDir(tmp_path) as held:
        held.lock()
        other = RunDir(tmp_path)
        with pytest.raises(Exception, match="another tinygraft process"):
            other.lock()
    RunDir(tmp_path).lock()  # released by the with block
