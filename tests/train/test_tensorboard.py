"""`train.tensorboard=true`: the event files under RUN/tensorboard/ hold metrics.jsonl's rows (every number, each
step once, a resumed or crashed-and-resumed run too) and the config; without the extra, one sentence."""

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from tests.train.finetune_fixtures import make_env
from tests.train.test_cli import pretrain, run
from tests.train.test_loop import make_job, quiet, small_cfg
from tinygraft.core import checkpoint
from tinygraft.train.board import MISSING
from tinygraft.train.loop import train
from tinygraft.train.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")
ON = ["--set", "train.tensorboard=true"]


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """Twenty documents of pydoc_data.topics, as test_cli's runs use."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "corpus"
    d.mkdir()
    for name in sorted(topics)[:20]:
        (d / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return d


def event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "tensorboard").iterdir() if "tfevents" in p.name)


def read_events(run_dir: Path) -> tuple[list[tuple[str, int, float]], list[str]]:
    """(every scalar as (tag, step, value), every config text) across all event files, as written (no purging)."""
    scalars, texts = [], []
    for path in event_files(run_dir):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.append((value.tag, event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "text":
                    texts.append(value.tensor.string_val[0].decode("utf-8"))
    return scalars, texts


def expected(run_dir: Path) -> dict[tuple[str, int], float]:
    """metrics.jsonl's numbers as TensorBoard keeps them (float32), keyed (split/key, step)."""
    out = {}
    for row in RunDir(run_dir).metrics():
        for key, value in row.items():
            if key not in ("step", "split"):
                out[(f"{row['split']}/{key}", row["step"])] = float(np.float32(value))
    return out


def assert_mirrors_metrics(run_dir: Path) -> list[str]:
    scalars, texts = read_events(run_dir)
    counts = Counter((tag, step) for tag, step, _ in scalars)
    assert not [k for k, n in counts.items() if n > 1], "a step appears twice in the event files"
    got = {(tag, step): value for tag, step, value in scalars}
    want = expected(run_dir)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), key
    return texts


def test_pretrain_scalars_equal_metrics_and_config_is_text(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code, _, err = pretrain(out, corpus, capsys, *ON, steps=6)
    assert code == 0, err
    texts = assert_mirrors_metrics(out)
    tags = {tag for tag, _, _ in read_events(out)[0]}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"} <= tags
    assert len(texts) == 1
    config = json.loads("\n".join(line[4:] for line in texts[0].splitlines()))  # an indented markdown code block
    assert config["train"]["tensorboard"] is True and config["preset"] == "gpt-tiny"
    # --overwrite replaces the TensorBoard view with the run
    code, _, err = pretrain(out, corpus, capsys, "--overwrite", steps=2)
    assert code == 0, err
    assert not (out / "tensorboard").exists()


def test_resume_after_a_crash_writes_each_step_once(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code, _, err = pretrain(out, corpus, capsys, *ON, "--stop-at", 8, steps=10)
    assert code == 0, err
    # A crash after step 8 was logged but before it was checkpointed: the newest checkpoint is step 5's, and
    # metrics.jsonl and the event file run on to step 8, which the resumed run logs again.
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    (out / "checkpoints" / "latest").write_text("step-00000005\n", encoding="utf-8")
    assert max(r["step"] for r in RunDir(out).metrics()) == 8
    code, _, err = run(["pretrain", "--out", out, "--resume", "--stop-at", 7], capsys)
    assert code == 0, err
    assert_mirrors_metrics(out)
    assert max(r["step"] for r in RunDir(out).metrics()) == 7
    code, _, err = run(["pretrain", "--out", out, "--resume"], capsys)
    assert code == 0, err
    texts = assert_mirrors_metrics(out)
    assert {step for _, step, _ in read_events(out)[0]} == set(range(1, 11))
    assert len(event_files(out)) == 1 and len(texts) == 1  # rebuilt by the last start, with its config


def test_turned_on_at_resume_holds_the_whole_run(tmp_path):
    cfg = small_cfg(steps=8)
    run_dir = RunDir(tmp_path)
    run_dir.prepare(resume=False, overwrite=False)
    train(make_job(cfg), cfg, run_dir, stop_at=4, progress=quiet())
    assert not (tmp_path / "tensorboard").exists()  # off by default
    on = small_cfg(steps=8, tensorboard=True)
    out = train(make_job(on), on, run_dir, resume=checkpoint.load(tmp_path), progress=quiet())
    assert out.status == "completed"
    assert_mirrors_metrics(tmp_path)
    assert {step for _, step, _ in read_events(tmp_path)[0]} == {2, 4, 6, 8}


def test_finetune_and_its_adapt_first_phase(tmp_path_factory, tmp_path, capsys):
    env = make_env(tmp_path_factory.mktemp("ft"))
    out = tmp_path / "ft"
    args = ["finetune", "--from", env["bert"], "--out", out, "--steps", 4, "--batch-size", 8, "--max-length", 32,
            "--eval-every", 2, "--train", env["train"], "--val", env["val"], "--adapt-first", 4,
            "--tensorboard"]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert_mirrors_metrics(out)
    assert ("val/accuracy", 4) in {(tag, step) for tag, step, _ in read_events(out)[0]}
    assert_mirrors_metrics(out / "adapt-first")


@pytest.mark.parametrize("command", ["pretrain", "finetune", "compare"])
def test_without_the_extra_one_sentence_before_anything(tmp_path, corpus, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what importing it does without tensorboard
    out = tmp_path / "run"
    if command == "pretrain":
        code, _, err = pretrain(out, corpus, capsys, *ON, steps=2)
    else:
        code, _, err = run([command, "--out", out, "--set", "train.tensorboard=true"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {MISSING}"]
    assert "pip install 'tinygraft[tensorboard]'" in err
    assert not out.exists() or not any(out.iterdir())
