"""The `tinygraft` command as a user types it: each subcommand, exact resume, Ctrl-C, and every bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from tinygraft.__main__ import main
from tinygraft.core import checkpoint
from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.train.pretrain import unigram_entropy
from tinygraft.train.progress import Progress

REPO = Path(__file__).resolve().parents[2]
# A small GPT and a short run: each pretrain below takes a second or two on a CPU.
TINY = [
    "--set",
    "model.n_layer=2",
    "--set",
    "model.n_embd=64",
    "--set",
    "model.n_head=2",
    "--set",
    "data.vocab_size=512",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.seq_len=32",
    "--set",
    "train.eval_every=5",
    "--set",
    "train.eval_batches=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.warmup_steps=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """Twenty documents of the default corpus (pydoc_data.topics) as a directory of .txt files."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "corpus"
    d.mkdir()
    for name in sorted(topics)[:20]:
        (d / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return d


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pretrain(out, corpus, capsys, *extra, steps=10):
    return run(["pretrain", "--out", out, "--data", corpus, "--steps", steps, *TINY, *extra], capsys)


def test_pretrain_sample_eval_info(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code, stdout, err = pretrain(out, corpus, capsys, "--set", "train.lr=1e-2", steps=30)
    assert code == 0, err
    assert "unigram entropy of the val tokens" in err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "pretrain-causal-lm" and results["method"] == "full" and results["kept"] == "final"
    # The unigram entropy, computed here from the same val tokens, and the trained model beats it.
    docs = read_corpus(corpus)
    tok = TextTokenizer.load(out / "checkpoints" / "step-00000030")
    cache = TokenCache.build(docs, tok, val_fraction=0.1)
    counts = np.bincount(np.asarray(cache.val, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    assert results["val_unigram_entropy"] == pytest.approx(entropy, rel=1e-9)
    assert unigram_entropy(cache.val) == pytest.approx(entropy, rel=1e-9)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["split"] == "train" and rows[0]["loss"] == pytest.approx(np.log(512), abs=0.3)  # uniform at init
    assert results["metrics"]["loss"] < rows[0]["loss"] - 0.7  # (beating the entropy takes the full gpt-tiny run)
    for name in ("config.json", "metrics.jsonl", "results.json", "loss.png"):
        assert (out / name).is_file()

    code, stdout, err = run(["sample", out, "--prompt", "The for statement", "--tokens", 20, "--seed", 3], capsys)
    assert code == 0, err
    assert stdout.startswith("The for statement") and len(stdout) > len("The for statement") + 10
    code, again, _ = run(["sample", out, "--prompt", "The for statement", "--tokens", 20, "--seed", 3], capsys)
    assert again == stdout  # the seed fixes the sample
    code, nocache, _ = run(
        ["sample", out, "--prompt", "The for statement", "--tokens", 20, "--temperature", 0, "--no-kv-cache"], capsys
    )
    code, cached, _ = run(["sample", out, "--prompt", "The for statement", "--tokens", 20, "--temperature", 0], capsys)
    assert code == 0 and cached == nocache  # greedy decoding: the KV cache changes nothing
    code, stdout, err = run(["sample", out, "--top-p", 0.9, "--top-k", 0, "--num-samples", 2, "--tokens", 5], capsys)
    assert code == 0 and stdout.count("--- sample") == 2

    code, stdout, err = run(["eval", out, "--batches", 4], capsys)  # what training evaluated on
    assert code == 0, err
    loss = float(stdout.split("loss ")[1].split(",")[0])
    assert loss == pytest.approx(results["metrics"]["loss"], abs=1e-3)
    code, stdout, err = run(["eval", out, "--data", corpus / "assert.txt"], capsys)
    assert code == 0 and "perplexity" in stdout, err

    code, stdout, err = run(["info", out], capsys)
    assert code == 0, err
    for text in ("step 30 of 30", "parameters", "tokens seen", "last val", "backend", "unused", "model.n_layer = 2"):
        assert text in stdout, text
    code, stdout, err = run(["info", out / "checkpoints" / "step-00000030", "--json"], capsys)
    d = json.loads(stdout)
    assert d["tokens_seen"] == 30 * 8 * 32 and d["unused"] == [] and d["total_params"] == results["total_params"]


def test_stop_and_resume_equals_straight_run(tmp_path, corpus, capsys):
    drop = ["--set", "model.dropout=0.1"]
    assert pretrain(tmp_path / "straight", corpus, capsys, *drop, steps=8)[0] == 0
    code, _, err = pretrain(tmp_path / "split", corpus, capsys, *drop, "--stop-at", 4, steps=8)
    assert code == 0 and "stopped at step 4" in err
    torch.manual_seed(123)  # a resumed process starts with other RNG states
    code, _, err = run(["pretrain", "--out", tmp_path / "split", "--resume"], capsys)
    assert code == 0, err
    a = checkpoint.load(tmp_path / "straight").model
    b = checkpoint.load(tmp_path / "split").model
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    state_a = checkpoint.load(tmp_path / "straight").trainer_state
    state_b = checkpoint.load(tmp_path / "split").trainer_state
    assert state_a["data"] == state_b["data"] and state_a["rng"] == state_b["rng"]
    assert state_a["tokens_seen"] == state_b["tokens_seen"]


def test_bert_tiny_mlm_lowers_masked_token_loss(tmp_path, corpus, capsys):
    out = tmp_path / "bert"
    code, _, err = run(
        [
            "pretrain",
            "--preset",
            "bert-tiny",
            "--out",
            out,
            "--data",
            corpus,
            "--steps",
            100,
            *TINY,
            "--set",
            "train.lr=3e-3",
            "--set",
            "train.eval_every=25",
            "--set",
            "train.seq_len=64",
        ],
        capsys,
    )
    assert code == 0, err
    val = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]
    first_train = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert val[-1] < first_train - 0.5 and val[-1] < val[0] - 0.05, (first_train, val)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "pretrain-mlm"
    code, stdout, err = run(["sample", out], capsys)
    assert code == 2 and "sample needs a GPT checkpoint" in err
    code, stdout, err = run(["eval", out], capsys)
    assert code == 0 and "loss" in stdout, err


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "tinygraft",
        "pretrain",
        "--out",
        str(out),
        "--data",
        str(corpus),
        "--steps",
        "100000",
        *TINY,
        "--set",
        "train.eval_every=100000",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: saved step" in err and "Traceback" not in err
    ckpt = checkpoint.load(out)
    assert ckpt.step >= 3
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["step"] == ckpt.step
    code, _, err = run(["pretrain", "--out", out, "--resume", "--stop-at", ckpt.step + 2], capsys)
    assert code == 0, err
    assert checkpoint.load(out).step == ckpt.step + 2


def test_nan_loss_stops_naming_the_step(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    # lr = step + 1 (a warmup that never ends): finite for a few steps, then the weights blow up.
    code, _, err = pretrain(
        out,
        corpus,
        capsys,
        "--set",
        "train.lr=1e8",
        "--set",
        "train.warmup_steps=100000000",
        "--set",
        "train.grad_clip=0",
        "--set",
        "train.eval_every=1",
        steps=50,
    )
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # (the lines before it are the run's progress)
    assert re.search(r"^error: the (validation loss|loss|gradient norm) became (nan|inf) at step \d+", last), err
    step = int(last.split(" at step ")[1].split(";")[0])
    assert step > 1, err  # otherwise this test would not show a checkpoint kept intact
    ckpt = checkpoint.load(out)
    assert ckpt.step == step - 1 and f"step-{step - 1:08d}" in last  # the last good checkpoint is intact
    assert all(torch.isfinite(t).all() for t in ckpt.model.values())


def _tokenizer_file(corpus, tmp_path, vocab=300):
    tok = TextTokenizer.train(read_corpus(corpus), "bpe", vocab)
    return tok.save(tmp_path / "tok")


BAD = {
    "missing corpus": (["--data", "{tmp}/nope"], "corpus path '.*nope' does not exist"),
    "empty corpus dir": (["--data", "{tmp}/empty"], "holds no text files"),
    "empty corpus file": (["--data", "{tmp}/blank.txt"], "is empty"),
    "seq_len above positions": (["--set", "train.seq_len=300"], "train.seq_len=300 is longer than the model's 256"),
    "tokenizer too big": (["--set", "data.tokenizer={tok}", "--set", "model.vocab_size=100"], "tokenizer has 300"),
    "unknown preset": (["--preset", "gpt-huge"], "unknown preset 'gpt-huge'"),
    "unknown key": (["--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    "unknown section": (["--set", "optim.lr=1"], "unknown config key 'optim.lr'"),
    "wrong type": (["--set", "train.steps=ten"], "train.steps must be an integer"),
    "wrong type in file": (["--config", "{tmp}/bad.toml"], "train.lr must be float"),
    "unknown key in file": (["--config", "{tmp}/unknown.toml"], "unknown train key 'speed'"),
    "missing config file": (["--config", "{tmp}/none.toml"], "does not exist"),
    "not key=value": (["--set", "train.lr"], "must look like key=value"),
    "stop beyond steps": (["--stop-at", "11"], "beyond the run's 10 steps"),
    "bad device": (["--device", "tpu"], "--device 'tpu' is not a device"),
    "resume nothing": (["--resume"], "nothing to resume"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pretrain_input_is_one_sentence_exit_2(tmp_path, corpus, capsys, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "bad.toml").write_text('[train]\nlr = "fast"\n')
    (tmp_path / "unknown.toml").write_text("[train]\nspeed = 3\n")
    args, message = BAD[case]
    tok = _tokenizer_file(corpus, tmp_path) if case == "tokenizer too big" else ""
    args = [a.format(tmp=tmp_path, tok=tok) for a in args]
    if "--data" not in args:
        args = ["--data", str(corpus), *args]
    code, _, err = run(["pretrain", "--out", tmp_path / "run", "--steps", 10, *TINY, *args], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_existing_run_is_refused_then_resume_and_overwrite_rules(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert pretrain(out, corpus, capsys, "--stop-at", 5)[0] == 0
    before = (out / "checkpoints" / "latest").read_text()
    code, _, err = pretrain(out, corpus, capsys)
    assert code == 2 and "already holds a run; pass --resume to continue it or --overwrite" in err
    assert (out / "checkpoints" / "latest").read_text() == before  # nothing lost
    code, _, err = run(["pretrain", "--out", out, "--resume", "--steps", 20], capsys)
    assert code == 2 and "train.steps would change from 10 to 20" in err
    code, _, err = run(["pretrain", "--out", out, "--resume", "--set", "model.n_layer=3"], capsys)
    assert code == 2 and "model.n_layer would change from 2 to 3" in err
    (corpus / "zzz-new.txt").write_text("A document added after the run started.\n" * 20)
    code, _, err = run(["pretrain", "--out", out, "--resume"], capsys)
    assert code == 2 and "changed since the checkpoint was written" in err
    (corpus / "zzz-new.txt").unlink()
    code, _, err = run(["pretrain", "--out", out, "--resume", "--overwrite"], capsys)
    assert code == 2 and "contradict" in err
    code, _, err = run(["pretrain", "--out", out, "--resume", "--keep", 1, "--device", "cpu"], capsys)
    assert code == 0, err  # keep and device may change
    assert checkpoint.list_steps(out / "checkpoints")[-1] == 10
    code, _, err = run(["pretrain", "--out", out, "--resume"], capsys)
    assert code == 2 and "already finished its 10 steps" in err
    code, _, err = pretrain(out, corpus, capsys, "--overwrite", "--set", "train.seq_len=999", steps=3)
    assert code == 2 and checkpoint.list_steps(out / "checkpoints")[-1] == 10  # refused before deleting anything
    code, _, err = pretrain(out, corpus, capsys, "--overwrite", steps=3)
    assert code == 0 and checkpoint.list_steps(out / "checkpoints") == [3]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "is corrupt"),
        ("missing", "incomplete: model.safetensors is missing"),
        ("dangling", "names 'step-00000077', which does not exist"),
    ],
)
def test_bad_checkpoint_is_one_sentence_for_every_command(tmp_path, corpus, capsys, damage, message):
    out = tmp_path / "run"
    assert pretrain(out, corpus, capsys, steps=5)[0] == 0
    step = out / "checkpoints" / "step-00000005"
    if damage == "truncate":
        f = step / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "missing":
        (step / "model.safetensors").unlink()
    else:
        (out / "checkpoints" / "latest").write_text("step-00000077\n")
    for cmd in (["sample", out], ["eval", out], ["info", out], ["pretrain", "--out", out, "--resume"]):
        code, _, err = run(cmd, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (cmd, err)


def test_python_dash_m_and_no_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "tinygraft", "info", str(tmp_path / "nothing")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint path") and "Traceback" not in proc.stderr
    assert main([]) == 2


def test_config_file_flags_and_set_priority(tmp_path, corpus, capsys):
    (tmp_path / "run.toml").write_text(
        'preset = "gpt-tiny"\n[train]\nsteps = 7\nlr = 0.002\n[model]\nn_layer = 1\nn_embd = 64\nn_head = 2\n'
    )
    out = tmp_path / "run"
    code, _, err = run(
        [
            "pretrain",
            "--out",
            out,
            "--data",
            corpus,
            "--config",
            tmp_path / "run.toml",
            "--steps",
            4,
            "--set",
            "train.lr=0.001",
            "--set",
            "data.vocab_size=300",
            "--set",
            "train.seq_len=16",
        ],
        capsys,
    )
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["train"]["lr"] == 0.001  # flags and --set beat the file
    assert cfg["model"]["n_layer"] == 1 and cfg["model"]["vocab_size"] <= 300  # the vocab comes from the tokenizer
    assert cfg["data"]["corpus"] == str(corpus)
    assert checkpoint.load(out).config == cfg


def test_progress_bar_shows_step_loss_lr_tokens_and_eta(capsys):
    bar = Progress(total=10, initial=2, enabled=True)
    bar.update(5, 1.25, 3e-4, 12345.0)
    bar.bar.refresh()
    bar.write("step 5/10: val loss 1.0")
    bar.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss 1.2500" in err and "lr 3.00e-04" in err and "12,345 tok/s" in err and "<" in err
    assert "step 5/10: val loss 1.0" in err
