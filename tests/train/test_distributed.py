"""Several processes, one run (torchrun, gloo on the CPU): N processes compute what one process computes.

Each launch costs seconds (two Python processes importing torch), so a few launches carry many checks:
  - pretrain, 2 processes, dropout on, 2 micro-steps a step, --stop-at: the weights and optimizer state equal the
    one-process run's at the same step (1e-5), the sharded evaluations equal its evaluations, and the checkpoint
    resumes in one process to the straight run's next loss and final weights;
  - finetune LoRA (dropout on) of a tiny BERT: the adapter checkpoint equals the one-process one; a task
    distillation (its teacher's outputs cached per example) likewise;
  - the same two under FSDP2 (--fsdp): sharded checkpoints whose assembled tensors equal the one-process ones, an
    export of the sharded step, and a resume on one process;
  - a bad input on rank 1 only, and a NaN every rank meets: both stop within 60 s, with one sentence;
  - Ctrl-C: a complete checkpoint, saved well within torchrun's 30 s shutdown.
The 3-process resume and the two-node rendezvous take longer: TINYGRAFT_SLOW=1 runs them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.tiny_runs import write_corpus
from tests.train.finetune_fixtures import demo_rows, make_bert_dir, make_data
from tinygraft.cli.main import main
from tinygraft.core import checkpoint, dist
from tinygraft.models.gpt import GPT

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TINYGRAFT_CPU_BF16": "0"}
LAUNCH_TIMEOUT_S = 120
ATOL = 1e-5

# A one-layer GPT, 16-token windows, dropout on, two micro-batches of 6 rows a step (6: 2 and 3 processes share it).
TINY = ["--preset", "gpt-tiny", "--set", "model.n_head=2", "--set", "model.n_layer=1", "--set", "model.n_embd=32",
        "--set", "data.vocab_size=300", "--set", "train.seq_len=16", "--set", "train.batch_size=6", "--set",
        "train.grad_accum=2", "--set", "model.dropout=0.1", "--set", "train.eval_every=2", "--set",
        "train.eval_batches=3", "--set", "train.warmup_steps=1", "--set", "train.log_every=1", "--set",
        "train.keep=10", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
slow = pytest.mark.skipif(os.environ.get("TINYGRAFT_SLOW") != "1", reason="TINYGRAFT_SLOW=1 runs the long launches")


def torchrun(args, n: int = 2, cwd: Path | None = None, entry=("-m", "tinygraft"), launcher=("--standalone",)):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(n), *entry,
           *[str(a) for a in args]]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def one_process(args) -> None:
    torch.set_num_threads(1)
    assert main([str(a) for a in args]) == 0


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def assert_same_tensors(a: Path, b: Path, atol: float = ATOL) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0, msg=f"{a.name}: {k}")


def rows(run: Path, split: str) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def straight_and_stopped(tmp_path: Path, stop_at: int, *flags) -> tuple[Path, Path]:
    """The one-process run of 6 steps, and the same run on 2 processes stopped at `stop_at`."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    straight, two = tmp_path / "straight", tmp_path / "two"
    one_process(["pretrain", "--out", straight, "--data", corpus, *TINY, "--steps", 6])
    done = torchrun(["pretrain", "--out", two, "--data", corpus, *TINY, "--steps", 6, "--stop-at", stop_at, *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank1]" not in done.stderr and "Traceback" not in done.stderr
    return straight, two


def test_ddp_pretrain_equals_one_process_and_its_checkpoint_resumes_on_one(tmp_path, capsys):
    straight, two = straight_and_stopped(tmp_path, 4)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(step_dir(straight, 4) / name, step_dir(two, 4) / name)
    for step in (2, 4):  # each rank scored its share of the validation batches; the shares were summed
        assert rows(two, "val")[step]["loss"] == pytest.approx(rows(straight, "val")[step]["loss"], rel=1e-6)
        assert rows(two, "train")[step]["loss"] == pytest.approx(rows(straight, "train")[step]["loss"], rel=1e-6)

    one_process(["pretrain", "--out", two, "--resume"])  # saved by 2 processes, continued by 1
    capsys.readouterr()
    assert rows(two, "train")[5]["loss"] == pytest.approx(rows(straight, "train")[5]["loss"], rel=1e-6)
    assert_same_tensors(step_dir(straight, 6) / "model.safetensors", step_dir(two, 6) / "model.safetensors")


def test_fsdp_pretrain_equals_one_process_exports_and_resumes_on_one(tmp_path, capsys):
    straight, two = straight_and_stopped(tmp_path, 4, "--fsdp")
    saved = checkpoint.load(two)  # sharded: every rank's part, assembled
    assert saved.trainer_state["sharded"] and not (saved.path / "model.safetensors").exists()
    assert len(list((saved.path / "sharded").glob("*.safetensors"))) == 2
    ref = checkpoint.load(straight / "checkpoints" / "step-00000004")
    assert saved.model.keys() == ref.model.keys()
    for k, v in ref.model.items():
        torch.testing.assert_close(saved.model[k], v, atol=ATOL, rtol=0, msg=k)
    for i, per in ref.optimizer["state"].items():
        for key, v in per.items():
            torch.testing.assert_close(saved.optimizer["state"][i][key], v, atol=ATOL, rtol=0, msg=f"{i}.{key}")

    assert main(["export", str(two), "--to", str(tmp_path / "hf")]) == 0  # the sharded step, in one file
    exported = GPT.from_pretrained(tmp_path / "hf").state_dict()  # read back from GPT-2's layout
    for k, v in ref.model.items():
        torch.testing.assert_close(exported[k], v, atol=ATOL, rtol=0, msg=k)

    one_process(["pretrain", "--out", two, "--resume"])  # sharded by 2 processes, continued by 1
    capsys.readouterr()
    assert rows(two, "train")[5]["loss"] == pytest.approx(rows(straight, "train")[5]["loss"], rel=1e-6)
    assert_same_tensors(step_dir(straight, 6) / "model.safetensors", step_dir(two, 6) / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-task")
    texts = [r[0] for r in demo_rows()[0]]
    return make_bert_dir(root, texts), make_data(root)


def lora_runs(tmp_path: Path, tiny_task, steps: int, *flags) -> tuple[dict, dict]:
    """results.json of a LoRA fine-tuning (dropout on) in one process (RUN/one) and in two (RUN/two, with `flags`)."""
    base, data = tiny_task
    args = ["finetune", "--from", base, "--task", "classify", "--train", data["train"], "--val", data["val"],
            "--method", "lora", "--lora-dropout", "0.1", "--steps", steps, "--batch-size", 8, "--eval-every",
            steps // 2, "--device", "cpu", "--precision", "fp32", "--max-length", 32]  # fmt: skip
    one_process([*args, "--out", tmp_path / "one"])
    done = torchrun([*args, *flags, "--out", tmp_path / "two"])
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))


def test_ddp_lora_finetune_saves_the_one_process_adapter(tmp_path, tiny_task, capsys):
    one, two = lora_runs(tmp_path, tiny_task, 6)
    assert two["metrics"]["accuracy"] == one["metrics"]["accuracy"]  # every validation example scored once
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-6)
    saved = sorted(p.name for p in step_dir(tmp_path / "one", 6).glob("*.safetensors"))
    assert saved == sorted(p.name for p in step_dir(tmp_path / "two", 6).glob("*.safetensors"))
    for name in saved:
        assert_same_tensors(step_dir(tmp_path / "one", 6) / name, step_dir(tmp_path / "two", 6) / name)


def test_fsdp_lora_checkpoint_holds_every_rank_part_of_the_adapter(tmp_path, tiny_task, capsys):
    one, two = lora_runs(tmp_path, tiny_task, 4, "--fsdp")
    assert two["metrics"]["accuracy"] == one["metrics"]["accuracy"]
    ref, got = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "two")
    assert got.trainer_state["sharded"] and got.model.keys() == ref.model.keys()  # the adapter and the head only
    for k, v in ref.model.items():  # accelerate#4206 saved (N-1)/N of each tensor missing under FSDP2
        torch.testing.assert_close(got.model[k], v, atol=ATOL, rtol=0, msg=k)


def test_ddp_distillation_with_the_teacher_cache_equals_one_process(tmp_path, tiny_task, capsys):
    base, data = tiny_task
    task = ["--train", data["train"], "--val", data["val"], "--batch-size", 8, "--max-length", 32, "--device", "cpu",
            "--precision", "fp32"]  # fmt: skip
    one_process(["finetune", "--from", base, *task, "--steps", 3, "--out", tmp_path / "teacher"])
    args = ["distill", "--teacher", tmp_path / "teacher", "--student-from-teacher", "0,2", *task, "--steps", 4,
            "--eval-every", 2]  # fmt: skip
    one_process([*args, "--out", tmp_path / "one"])
    done = torchrun([*args, "--out", tmp_path / "two"])  # each rank reads its rows' teacher outputs from the cache
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(step_dir(tmp_path / "one", 4) / name, step_dir(tmp_path / "two", 4) / name)


def test_a_bad_input_on_rank_1_only_stops_both_with_one_sentence(tmp_path, tiny_task):
    base, data = tiny_task
    args = ["finetune", "--from", base, "--task", "classify", "--train", data["train"], "--val", data["val"],
            "--method", "lora", "--steps", 6, "--batch-size", 8, "--device", "cpu",
            "--out", tmp_path / "run"]  # fmt: skip
    t0 = time.monotonic()
    done = torchrun(args, cwd=tmp_path, entry=(str(HERE / "dist_worker.py"),))
    assert time.monotonic() - t0 < 60
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert ours == [f"error (rank 1 of 2): data file '{tmp_path / 'missing-on-rank-1.tsv'}' does not exist"]
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr  # no worker's traceback


def test_a_nan_every_rank_meets_stops_them_all_at_one_step_with_one_sentence(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    t0 = time.monotonic()
    done = torchrun(["pretrain", "--out", tmp_path / "run", "--data", corpus, *TINY, "--steps", 50, "--set",
                     "train.lr=1e12", "--set", "train.grad_clip=0"])  # fmt: skip
    assert time.monotonic() - t0 < 60 and done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(ours) == 1 and " became nan at step " in ours[0] and ours[0].startswith("error: the ")  # rank 0's
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr


def test_ctrl_c_under_torchrun_saves_one_complete_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinygraft",
           "pretrain", "--out", str(out), "--data", str(corpus), *TINY, "--steps", "100000"]  # fmt: skip
    # Its own session, as a terminal's foreground job: Ctrl-C reaches torchrun and both workers.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (out / "metrics.jsonl").is_file() or len(rows(out, "train")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30  # torchrun's shutdown timeout: it SIGKILLs workers after 30 s
    saved = checkpoint.load(out)  # complete: every file present, every digest right
    assert f"interrupted: saved step {saved.step} in {out}/checkpoints" in err
    assert saved.step >= 3 and saved.trainer_state["step"] == saved.step


def test_a_global_batch_the_processes_cannot_share_is_one_sentence(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(Exception, match=r"train.batch_size 10 is the global batch, which 4 processes cannot split "
                       r"evenly; use a multiple of 4 \(e.g. 8 or 12: 2 or 3 rows per process\)"):  # fmt: skip
        dist.split(10)
    assert dist.split(12) == 3


def test_shard_cuts_rows_and_keeps_constants():
    batch = {"input_ids": torch.arange(12).view(6, 2), "adapter": list("abcdef"), "n": 3, "mask": torch.ones(2)}
    part = dist.shard(batch, 2, 4)
    assert part["input_ids"].tolist() == [[4, 5], [6, 7]] and part["adapter"] == ["c", "d"]
    assert part["n"] == 3 and part["mask"].shape == (2,)  # not the batch's rows: kept whole
    x, y = dist.shard((torch.zeros(6, 3), torch.ones(6, 3)), 3, 6)
    assert x.shape == y.shape == (3, 3)


# ---------------------------------------------------------------------------------------------------- slow
@slow
@pytest.mark.parametrize("flags", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_on_three(tmp_path, capsys, flags):
    straight, run = straight_and_stopped(tmp_path, 2, *flags)  # FSDP: 2 shards, read back as 3
    done = torchrun(["pretrain", "--out", run, "--resume"], n=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(run, "train")[3]["loss"] == pytest.approx(rows(straight, "train")[3]["loss"], rel=1e-6)
    got, ref = checkpoint.load(step_dir(run, 6)), checkpoint.load(step_dir(straight, 6))
    assert got.trainer_state.get("sharded", False) == bool(flags) and got.model.keys() == ref.model.keys()
    for k, v in ref.model.items():
        torch.testing.assert_close(got.model[k], v, atol=ATOL, rtol=0, msg=k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slow
def test_two_nodes_meet_at_a_c10d_rendezvous_and_train_what_one_process_trains(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    straight, run = tmp_path / "straight", tmp_path / "run"
    one_process(["pretrain", "--out", straight, "--data", corpus, *TINY, "--steps", 6])
    port = free_port()
    nodes = []
    for node in (0, 1):  # two launches, one process each, as on two machines
        launcher = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    f"127.0.0.1:{port}", "--rdzv-id", "tinygraft-test", "--nproc_per_node", "1"]  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "tinygraft", "pretrain", "--out",
               str(run), "--data", str(corpus), *TINY, "--steps", "6"]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in nodes:
        _, err = p.communicate(timeout=LAUNCH_TIMEOUT_S)
        assert p.returncode == 0, err[-3000:]
    assert_same_tensors(step_dir(straight, 6) / "model.safetensors", step_dir(run, 6) / "model.safetensors")
