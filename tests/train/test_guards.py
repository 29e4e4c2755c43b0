"""The pitfall guards (train/guards.py): each fires on its case and stays silent otherwise, on hand-made settings and
metrics rows; a `finetune` run prints them and keeps them under `warnings` in results.json; a tokenizer that does not
belong to the checkpoint is refused in one sentence."""

import json
import shlex
import shutil

import pytest

from tests.cli.tiny_runs import run_cli as run
from tests.train.finetune_fixtures import demo_rows, make_env
from tinygraft.cli.main import build_parser
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.train import guards
from tinygraft.train.config import resolve_finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**flags):
    return resolve_finetune(None, None, flags, None)


def train_row(step, loss):
    return {"step": step, "split": "train", "loss": loss, "lr": 1e-3}


def val_row(step, loss):
    return {"step": step, "split": "val", "loss": loss, "accuracy": 0.5}


def rows_of(train: dict, val: dict) -> list[dict]:
    return sorted([train_row(s, v) for s, v in train.items()] + [val_row(s, v) for s, v in val.items()],
                  key=lambda r: (r["step"], r["split"] == "val"))  # fmt: skip


# ------------------------------------------------------------------------------------------- small data, full
def test_small_full_fires_below_500_examples_of_full_fine_tuning_only():
    command = guards.advise_command(cfg(method="full"), "/d/train.tsv", "/d/val.tsv")
    said = guards.small_full("full", 499, command)
    assert "499 training examples" in said and "linear probe or LoRA" in said and said.endswith(command)
    assert guards.small_full("full", 500, command) is None
    assert guards.small_full("lora", 40, command) is None and guards.small_full("linear-probe", 40, command) is None


def test_the_suggested_advise_command_is_one_the_cli_accepts():
    c = cfg(method="full", task="classify", **{"data.text_col": "sentence", "data.max_length": 64,
                                               "data.max_train": 300})  # fmt: skip
    command = guards.advise_command(c, "/my data/train.tsv", "/my data/dev.tsv")
    argv = shlex.split(command)
    assert argv[:2] == ["tinygraft", "advise"]
    ns = build_parser().parse_args(argv[1:])
    assert getattr(ns, "data.train") == "/my data/train.tsv" and getattr(ns, "data.val") == "/my data/dev.tsv"
    assert getattr(ns, "data.text_col") == "sentence" and getattr(ns, "data.max_train") == 300
    assert getattr(ns, "data.max_length") == 64 and ns.source == "minilm"


def test_before_training_skips_a_distilled_student():
    assert guards.before_training(cfg(method="full"), 100, "/t.tsv", "/v.tsv")
    assert guards.before_training(cfg(method="full"), 100, "/t.tsv", None)[0].count("--val") == 0
    assert guards.before_training(cfg(method="full", **{"distill.teacher": "/runs/t"}), 100, "/t.tsv", None) == []


# ---------------------------------------------------------------------------------------- high learning rate
SPIKY = rows_of({10: 0.69, 20: 2.9, 30: 1.4, 45: 9.0}, {20: 1.5, 30: 1.3, 40: 1.2, 50: 1.1})


def test_high_lr_fires_above_10x_the_default_on_a_pretrained_model_with_the_spike():
    said = guards.high_lr("full", 1e-3, 5e-5, True, SPIKY)
    assert said.startswith("--lr 0.001 is 20x full's default 5e-05 on a pretrained model")
    assert "rose from 0.69 at first to 2.9 at step 20" in said and said.endswith("try --lr 5e-05")
    calm = rows_of({10: 0.69, 20: 0.5}, {20: 0.6})
    assert "did not rise above its first 0.69" in guards.high_lr("full", 1e-3, 5e-5, True, calm)


def test_high_lr_stays_silent_at_10x_from_scratch_without_steps_or_default():
    assert guards.high_lr("full", 5e-4, 5e-5, True, SPIKY) is None  # 10x exactly is not "more than 10x"
    assert guards.high_lr("full", 1e-3, 5e-5, False, SPIKY) is None  # a student built from a preset
    assert guards.high_lr("linear-probe", None, 3e-3, True, SPIKY) is None  # a fitted probe steps at no rate
    assert guards.high_lr("mine", 1.0, None, True, SPIKY) is None  # a plugin without a default lr


def test_the_spike_is_read_up_to_the_third_evaluation():
    assert guards.loss_spike(SPIKY) == (0.69, 2.9, 20)  # step 45's 9.0 comes after the third evaluation (40)
    assert guards.loss_spike(rows_of({10: 1.0, 20: 3.0}, {})) == (1.0, 3.0, 20)  # no evaluation yet: every row
    assert guards.loss_spike([]) is None


def test_after_training_reads_the_method_default_and_the_source():
    assert guards.after_training(cfg(method="full"), 1e-3, SPIKY)[0].startswith("--lr 0.001 is 20x")
    student = cfg(method="full", **{"distill.teacher": "/runs/t", "distill.student": "bert-tiny"})
    assert not guards.from_pretrained(student) and guards.after_training(student, 1e-3, SPIKY) == []
    assert guards.from_pretrained(cfg(method="full", **{"distill.teacher": "/runs/t", "distill.student": "/hf/dir"}))


# ------------------------------------------------------------------------------------------------ overfitting
def test_overfitting_fires_when_the_gap_grows_over_three_evaluations():
    # train falls 0.6 -> 0.1 while validation turns up: gaps -0.05, 0.15, 0.35
    rows = rows_of({5: 0.65, 10: 0.55, 15: 0.3, 20: 0.3, 25: 0.1, 30: 0.1}, {10: 0.55, 20: 0.45, 30: 0.45})
    assert [round(g, 6) for _, g in guards.gaps(rows)] == [-0.05, 0.15, 0.35]
    said = guards.overfitting(rows, None)
    assert "over 3 evaluations in a row" in said and "-0.050 at step 10, 0.150 at step 20, 0.350 at step 30" in said
    assert "--patience N stops a run" in said
    assert "--patience 2 is on" in guards.overfitting(rows, 2)
    later = rows_of({10: 0.5, 20: 0.5, 30: 0.3, 40: 0.2}, {10: 0.6, 20: 0.5, 30: 0.5, 40: 0.5})  # 0.1, 0, 0.2, 0.3
    said = guards.overfitting(later, None)  # any three in a row, not only the first three
    assert "0.000 at step 20, 0.200 at step 30, 0.300 at step 40" in said and "step 10" not in said


def test_overfitting_stays_silent_on_a_shrinking_or_wavering_gap_or_too_few_evaluations():
    shrinking = rows_of({10: 0.9, 20: 0.6, 30: 0.5}, {10: 0.8, 20: 0.6, 30: 0.45})  # gaps -0.1, 0.0, -0.05
    assert guards.overfitting(shrinking, None) is None
    wavering = rows_of({10: 0.5, 20: 0.4, 30: 0.4, 40: 0.3}, {10: 0.5, 20: 0.5, 30: 0.45, 40: 0.45})
    assert guards.overfitting(wavering, None) is None  # gaps 0.0, 0.1, 0.05, 0.15: never three growing in a row
    two = rows_of({10: 0.5, 20: 0.2}, {10: 0.5, 20: 0.6})
    assert guards.overfitting(two, None) is None and guards.overfitting([], None) is None


def test_the_gap_uses_the_train_rows_since_the_last_evaluation():
    rows = rows_of({2: 1.0, 4: 0.5, 6: 0.3}, {4: 0.9, 6: 0.85, 8: 0.8})  # step 8: no new train row, the last one
    assert guards.gaps(rows) == [(4, pytest.approx(0.15)), (6, pytest.approx(0.55)), (8, pytest.approx(0.5))]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("guards"))


def test_finetune_prints_the_guards_and_keeps_them_in_results(env, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--from", env["bert"], "--train", env["train"], "--val", env["val"], "--out", out,
            "--steps", 4, "--batch-size", 8, "--max-length", 32, "--eval-every", 2, "--lr", "1e-2"]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 0, err
    warnings = json.loads((out / "results.json").read_text())["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith("full fine-tuning on 48 training examples (fewer than 500)")
    assert f"--train {env['train']}" in warnings[0] and "tinygraft advise --from" in warnings[0]
    assert warnings[1].startswith("--lr 0.01 is 200x full's default 5e-05 on a pretrained model")
    assert all(f"warning: {w}" in err for w in warnings)
    code, _, err = run([*args[:-2], "--method", "lora", "--out", tmp_path / "quiet"], capsys)
    assert code == 0 and "warning:" not in err, err
    assert json.loads((tmp_path / "quiet" / "results.json").read_text())["warnings"] == []


def test_a_tokenizer_that_does_not_belong_to_the_checkpoint_is_refused(env, tmp_path, capsys):
    """Already refused where the checkpoint is read (models/hf.py: check_tokenizer): the guard's case end to end."""
    odd = tmp_path / "odd-bert"
    shutil.copytree(env["bert"], odd)
    train, val = demo_rows()
    TextTokenizer.train([t for t, _ in train + val], "wordpiece", 2000).save(odd)
    args = ["finetune", "--from", odd, "--train", env["train"], "--val", env["val"], "--out", tmp_path / "r",
            "--steps", 1]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "but the model's embedding has only" in err and "does not belong to this checkpoint" in err
    assert not (tmp_path / "r").exists()
