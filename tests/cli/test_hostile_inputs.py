"""The repros of issue 14, each as a test: bad values, malformed run files, directories where files belong, OS
refusals, valid input that was refused, and what the user was told. Every refusal is one sentence and exit 2,
and leaves nothing behind that a retry would trip on."""

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli.tiny_runs import TINY, stopped_run, write_corpus
from tests.train.finetune_fixtures import demo_rows, make_bert_dir, make_data
from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.models import hf
from tinygraft.models.bert import BERTForMaskedLM
from tinygraft.train import runs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(result, *fragments):
    """Exit 2 and one sentence, last (progress lines may come before it), no traceback."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    err = err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A stopped pre-training run (4 of 8 steps), a BERT directory and the fine-tuning data files."""
    root = tmp_path_factory.mktemp("hostile")
    env = pytest.MonkeyPatch()
    env.setenv("XDG_CACHE_HOME", str(root / "cache"))
    stopped_run(root / "gpt", write_corpus(root / "corpus.txt"), steps=8, stop_at=4)
    train, _ = demo_rows()
    make_bert_dir(root, [t for t, _ in train])
    make_data(root)
    yield root
    env.undo()


@pytest.fixture
def gpt(made, tmp_path):
    """A fresh copy of the stopped run, to damage."""
    shutil.copytree(made / "gpt", tmp_path / "gpt")
    return tmp_path / "gpt"


def finetune_args(made, out, *extra):
    files = [] if "--train" in extra else ["--train", made / "train.tsv", "--val", made / "val.tsv"]  # given once
    return ["finetune", "--from", made / "tiny-bert", *files, "--steps", 2, "--batch-size", 8, "--out", out,
            *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    "setting, message",
    [("train.lr=nan", "train.lr must be a positive number, got nan"),
     ("train.beta1=2", "train.beta1 must be in [0, 1), got 2.0"),
     ("train.eps=-1", "train.eps must be a positive number, got -1.0"),
     ("train.grad_clip=inf", "train.grad_clip must be a number >= 0")],
)  # fmt: skip
def test_pretrain_values_are_checked_before_anything_is_written(made, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    refused(run(["pretrain", "--out", out, "--data", made / "corpus.txt", *TINY, "--set", setting], capsys), message)
    assert not out.exists()  # a retry with a good value is not told "already holds a run"


@pytest.mark.parametrize(
    "extra, message",
    [(["--lr", "nan"], "--lr must be a positive number, got nan"),
     (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
     (["--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
     (["--task", "similarity", "--train", "{pairs}", "--val", "{pairs}", "--max-score", "0"],
      "--max-score must be a positive number")],
)  # fmt: skip
def test_finetune_values_are_checked_before_anything_is_written(made, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    extra = [a.format(pairs=made / "pairs.tsv") for a in extra]
    err = refused(run(finetune_args(made, out, *extra), capsys), message)
    assert "train.lr" not in err or "--lr" in message
    assert not out.exists()


def test_sample_and_eval_values(gpt, capsys):
    refused(run(["sample", gpt, "--temperature", "nan"], capsys), "--temperature must be a number >= 0")
    refused(run(["eval", gpt, "--batches", "-2"], capsys), "--batches must be at least 1, got -2")


def test_a_prompt_longer_than_the_positions_is_cut_and_said_so(gpt, capsys):
    code, _, err = run(["sample", gpt, "--prompt", "line " * 400, "--tokens", 2], capsys)
    assert code == 0 and "note: the prompt's" in err and "sampling goes on from its last 255" in err


def test_sampling_from_nan_weights_names_the_divergence(gpt, capsys):
    step = checkpoint.resolve(gpt)
    weights = load_file(step / "model.safetensors")
    weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    save_file(weights, step / "model.safetensors")
    state = json.loads((step / "trainer_state.json").read_text())
    state["files"]["model.safetensors"] = hashlib.sha256((step / "model.safetensors").read_bytes()).hexdigest()
    (step / "trainer_state.json").write_text(json.dumps(state))
    refused(run(["sample", gpt, "--tokens", 3], capsys), "hold NaN or infinity", "the run diverged")


# ------------------------------------------------------------------------------------------ malformed run files
def _state(gpt):
    return checkpoint.resolve(gpt) / "trainer_state.json"


def damage_files(gpt):
    s = json.loads(_state(gpt).read_text())
    _state(gpt).write_text(json.dumps(dict(s, files="oops")))


def damage_step(gpt):
    s = json.loads(_state(gpt).read_text())
    del s["step"]
    _state(gpt).write_text(json.dumps(s))


def damage_empty(gpt):
    _state(gpt).write_text("{}")


def damage_latest_binary(gpt):
    (gpt / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00step\x80")


def damage_latest_outside(gpt):
    shutil.copytree(checkpoint.resolve(gpt), gpt / "elsewhere" / "step-00000004")
    (gpt / "checkpoints" / "latest").write_text("../elsewhere/step-00000004\n")


DAMAGE = {
    "files is a string": (damage_files, "records no sha256 of the checkpoint's files"),
    "no step": (damage_step, "names no step"),
    "empty trainer state": (damage_empty, "names no step"),
    "binary latest": (damage_latest_binary, "should name a step directory beside it"),
    "latest outside checkpoints": (damage_latest_outside, "should name a step directory beside it"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_malformed_run_files_are_one_sentence_for_every_command(gpt, tmp_path, capsys, case):
    damage, message = DAMAGE[case]
    damage(gpt)
    for cmd in (["info", gpt], ["eval", gpt], ["sample", gpt, "--tokens", 2], ["export", gpt, "--to", tmp_path / "x"],
                ["pretrain", "--out", gpt, "--resume"]):  # fmt: skip
        refused(run(cmd, capsys), message)
    assert not (tmp_path / "x").exists()


def test_a_non_utf8_byte_in_metrics_does_not_stop_info_or_resume(gpt, capsys):
    with open(gpt / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": \xff\xfe}\n')
    code, out, err = run(["info", gpt], capsys)
    assert code == 0, err
    code, _, err = run(["pretrain", "--out", gpt, "--resume"], capsys)
    assert code == 0, err
    assert checkpoint.load(gpt).step == 8


# ------------------------------------------------------------------------------ directories, files and the run kind
def test_a_directory_where_a_file_belongs_is_named_a_directory(made, gpt, tmp_path, capsys):
    d = tmp_path / "adir"
    d.mkdir()
    refused(run(["pretrain", "--out", tmp_path / "r", "--config", d], capsys), "is a directory; give a TOML file")
    refused(run(["finetune", "--out", tmp_path / "r", "--config", d], capsys), "is a directory")
    refused(run(["embed", "--from", gpt, "--input", d], capsys), "is a directory; give a file of texts")
    code = main([str(a) for a in finetune_args(made, tmp_path / "ft")])
    assert code == 0
    capsys.readouterr()
    refused(run(["predict", tmp_path / "ft", "--input", d], capsys), "is a directory")
    assert not (tmp_path / "r").exists()


def test_resuming_a_run_with_the_other_command_names_the_right_one(made, gpt, tmp_path, capsys):
    assert main([str(a) for a in finetune_args(made, tmp_path / "ft")]) == 0
    capsys.readouterr()
    refused(run(["pretrain", "--out", tmp_path / "ft", "--resume"], capsys), "holds a fine-tuning run",
            "tinygraft finetune --resume")  # fmt: skip
    refused(
        run(["finetune", "--out", gpt, "--resume"], capsys), "holds a pre-training run", "tinygraft pretrain --resume"
    )


def test_bert_eval_on_a_tiny_corpus_says_what_to_change(made, tmp_path, capsys):
    bert = runs.load(made / "tiny-bert")
    torch.manual_seed(0)
    BERTForMaskedLM(bert.model.config).save_pretrained(tmp_path / "mlm", bert.tokenizer)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("logging\n")
    refused(run(["eval", tmp_path / "mlm", "--data", tiny], capsys), "too few to score", "give a longer corpus")


def test_eval_of_a_run_whose_corpus_changed_refuses_to_call_it_the_validation_split(made, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(made / "corpus.txt", corpus)
    out = tmp_path / "run"
    assert main([str(a) for a in ["pretrain", "--out", out, "--data", corpus, *TINY, "--steps", 2]]) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # the corpus is recorded by its absolute path, so another cwd reads the same file
    try:
        code, out_text, err = run(["eval", out], capsys)
    finally:
        os.chdir(cwd)
    assert code == 0 and "the run's validation split" in out_text, err
    with open(corpus, "a") as f:
        f.write("an edit after training, which shifts the split.\n" * 40)
    refused(run(["eval", out], capsys), "is not the text the run was trained on any more", "--data")


# ----------------------------------------------------------------------------------------- valid input accepted
def test_utf8_bom_csv_and_u2028_inside_jsonl_strings_are_read(made, tmp_path, capsys):
    rows = [line.split("\t") for line in (made / "train.tsv").read_text().splitlines()[1:]]
    bom = tmp_path / "train.csv"
    with open(bom, "w", encoding="utf-8-sig", newline="") as f:
        f.write("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    code, _, err = run(["finetune", "--from", made / "tiny-bert", "--train", bom, "--val", made / "val.tsv",
                        "--steps", 1, "--batch-size", 8, "--out", tmp_path / "a"], capsys)  # fmt: skip
    assert code == 0, err
    sep = tmp_path / "train.jsonl"
    sep.write_text("".join(json.dumps({"text": t + "\u2028a second line", "label": y}, ensure_ascii=False) + "\n"
                           for t, y in rows), encoding="utf-8")  # fmt: skip
    assert "\u2028" in sep.read_text(encoding="utf-8")
    code, _, err = run(["finetune", "--from", made / "tiny-bert", "--train", sep, "--val", made / "val.tsv",
                        "--steps", 1, "--batch-size", 8, "--out", tmp_path / "b"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "results.json").read_text())["n_train"] == len(rows)  # none split apart


# ------------------------------------------------------------------------------------------------- export
def test_export_onto_its_own_run_is_refused_and_exports_are_readable(gpt, tmp_path, capsys):
    step = checkpoint.resolve(gpt)
    before = {p.name: p.read_bytes() for p in step.iterdir()}
    for target in (step, gpt / "checkpoints", gpt, step / "inside"):
        refused(run(["export", gpt, "--to", target, "--overwrite"], capsys), "is part of the run being exported")
    assert {p.name: p.read_bytes() for p in step.iterdir()} == before
    assert run(["sample", gpt, "--tokens", 2], capsys)[0] == 0
    to = tmp_path / "exported"
    assert run(["export", gpt, "--to", to], capsys)[0] == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in to.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as config.json


# ----------------------------------------------------------------------------------------------- OS refusals
def _refuse_under(monkeypatch, root: Path, err: int):
    """Make every directory creation under `root` fail as the OS would (tests run as root, whom chmod stops not)."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(self).resolve().is_relative_to(root.resolve()):
            raise OSError(err, os.strerror(err), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize(
    "err, message", [(errno.EACCES, "permission denied for"), (errno.EROFS, "the file system is read-only")]
)
def test_an_out_that_cannot_be_written_is_one_sentence(made, gpt, tmp_path, capsys, monkeypatch, err, message):
    ro = tmp_path / "ro"
    _refuse_under(monkeypatch, ro, err)
    refused(run(["pretrain", "--out", ro / "run", "--data", made / "corpus.txt", *TINY, "--steps", 2], capsys), message)
    refused(run(finetune_args(made, ro / "ft"), capsys), message)
    refused(run(["export", gpt, "--to", ro / "exp"], capsys), message)


def test_a_full_disk_while_saving_leaves_nothing_for_the_retry_to_trip_on(gpt, capsys, monkeypatch):
    real = checkpoint._write_synced

    def full(path, data):
        if path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", full)
    refused(run(["pretrain", "--out", gpt, "--resume"], capsys), "the disk is full", "--resume")
    assert not [p for p in (gpt / "checkpoints").iterdir() if p.name.startswith(".")]
    assert checkpoint.load(gpt).step == 4  # latest still names the last complete checkpoint
    monkeypatch.setattr(checkpoint, "_write_synced", real)
    assert run(["pretrain", "--out", gpt, "--resume"], capsys)[0] == 0
    assert checkpoint.load(gpt).step == 8


def test_a_full_disk_while_exporting_leaves_no_temporary_directory(gpt, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf, "save_file", full)
    refused(run(["export", gpt, "--to", tmp_path / "exp"], capsys), "the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt"]


# ------------------------------------------------------------------------------------------------- Ctrl-C
def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tinygraft", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)  # fmt: skip


# The child says "up" once tinygraft.__main__ is imported, as the console script's first line does, and is then
# interrupted inside `main`: in its imports (torch) or in the command. The interpreter's own start-up before that
# (site, .pth files) is Python's to answer, not ours.
UP = "import sys; from tinygraft.__main__ import main; print('up', flush=True); sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_ctrl_c_during_start_up_is_a_sentence(made, tmp_path, delay):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["pretrain", "--out", tmp_path / "run", "--data", made / "corpus.txt", *TINY, "--steps", 2000]
    proc = subprocess.Popen([sys.executable, "-c", UP, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == "up"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1].startswith("interrupted"), err


STEPS = 400  # enough that the run is still going when the interrupt comes (its first row is at step 10)


def test_ctrl_c_in_compare_lets_the_running_method_save_then_resumes_it(made, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--from", made / "tiny-bert", "--train", made / "train.tsv", "--val", made / "val.tsv",
            "--methods", "full", "--seeds", 0, "--steps", STEPS, "--batch-size", 4, "--max-length", 32,
            "--threads", 1, "--out", out]  # fmt: skip
    proc = _cli(*args, start_new_session=True)  # like a terminal: the signal goes to compare, as typed
    metrics = out / "full" / "seed-0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics.is_file(), "the child never logged a step"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "saves a checkpoint after its current step" in err, err
    stopped = checkpoint.load(out / "full" / "seed-0").step
    assert 1 <= stopped < STEPS
    results = json.loads((out / "full" / "seed-0" / "results.json").read_text())
    assert results["status"] == "interrupted"
    again = _cli(*args)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "resuming" in (out / "logs" / "full-seed-0.log").read_text()
    assert checkpoint.load(out / "full" / "seed-0").step == STEPS
