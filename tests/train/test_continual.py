"""`pretrain --from` with replay, EWC and watched texts: the replay rows are the ratio of every batch, the watched
text's loss is logged at each evaluation (before and after in results.json), EWC's Fisher is written once in the run
directory and a stopped run resumes exactly; bad input is refused before the run directory is touched."""

import json

import pytest
import torch

from tests.cli.tiny_runs import TINY, run_cli, stopped_run, write_corpus
from tinygraft.core import checkpoint
from tinygraft.train.ewc import FILE as EWC_FILE


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT pre-trained on the 'old' corpus, and a 'new' corpus of other text."""
    root = tmp_path_factory.mktemp("continual")
    old = write_corpus(root / "old.txt")
    new = root / "new.txt"
    new.write_text("".join(f"verse {i}: to be or not to be, that is the question.\n" for i in range(300)))
    return stopped_run(root / "base", old, 6, 6), old, new


def adapt(out, base_run, new, *flags, steps=6):
    return ["pretrain", "--out", out, "--from", base_run, "--data", new, *TINY[2:], "--steps", steps, *flags]


def test_replay_ewc_and_watch_on_a_continued_run(tmp_path, base, capsys):
    base_run, old, new = base
    out = tmp_path / "adapt"
    code, _, err = run_cli(adapt(out, base_run, new, "--replay", old, "--replay-ratio", 0.5, "--ewc", 10,
                                 "--ewc-samples", 4), capsys)  # fmt: skip
    assert code == 0, err
    assert (out / EWC_FILE).is_file() and not any(p.name == EWC_FILE for p in (out / "checkpoints").rglob("*"))
    results = json.loads((out / "results.json").read_text())
    # --replay watches the replay corpus by default; before is the base's own val loss there (same split)
    base_loss = json.loads((base_run / "results.json").read_text())["metrics"]["loss"]
    assert results["forgetting"]["watched"] == {"old": str(old)}
    assert results["forgetting"]["before"]["watch:old"] == pytest.approx(base_loss, rel=1e-6)
    assert "watch:old" in results["metrics"]
    val_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("watch:old" in r for r in val_rows if r["split"] == "val")
    config = json.loads((out / "config.json").read_text())
    assert config["continual"]["replay"] == str(old) and config["continual"]["ewc"] == 10


def test_a_replay_and_ewc_run_resumes_exactly(tmp_path, base, capsys):
    base_run, old, new = base
    flags = ("--replay", old, "--ewc", 50, "--ewc-samples", 3, "--watch", new)
    assert run_cli(adapt(tmp_path / "straight", base_run, new, *flags), capsys)[0] == 0
    code, _, err = run_cli(adapt(tmp_path / "split", base_run, new, *flags, "--stop-at", 3), capsys)
    assert code == 0, err
    torch.manual_seed(7)
    code, _, err = run_cli(["pretrain", "--out", tmp_path / "split", "--resume"], capsys)
    assert code == 0, err
    a, b = (checkpoint.load(tmp_path / n) for n in ("straight", "split"))
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], atol=1e-6, rtol=0, msg=k)
    assert a.trainer_state["data"] == b.trainer_state["data"]
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("straight", "split"))
    assert ra["forgetting"]["before"] == rb["forgetting"]["before"]  # kept across the resume, not re-measured


def test_ewc_with_lora_trains_and_its_penalty_moves_less(tmp_path, base, capsys):
    base_run, old, new = base
    lora = ("--method", "lora", "--set", "train.lr=0.05")
    assert run_cli(adapt(tmp_path / "free", base_run, new, *lora), capsys)[0] == 0
    code, _, err = run_cli(adapt(tmp_path / "kept", base_run, new, *lora, "--ewc", 1e6, "--ewc-samples", 4), capsys)
    assert code == 0, err
    delta = {}
    for name in ("free", "kept"):
        tensors = checkpoint.load(tmp_path / name).model
        delta[name] = sum(float(v.norm()) for k, v in tensors.items() if "lora_B" in k)
    assert delta["kept"] < delta["free"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--ewc", 1, "--method", "houlsby"), "changes none"),
        (("--replay", "missing.txt"), "does not exist"),
        (("--replay-ratio", 1.5), "between 0 and 1"),
        (("--ewc", -1), "--ewc must be a number >= 0"),
        (("--watch", "missing.txt"), "does not exist"),
    ],
)
def test_bad_continual_flags_are_refused_before_the_run_directory(tmp_path, base, capsys, flags, message):
    base_run, old, new = base
    code, _, err = run_cli(adapt(tmp_path / "r", base_run, new, *flags), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_ewc_needs_a_source(tmp_path, base, capsys):
    _, old, new = base
    args = ["pretrain", "--out", tmp_path / "r", "--data", new, *TINY, "--steps", 2, "--ewc", 1]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--ewc keeps the weights a run starts --from" in err


def test_forgetting_report_puts_runs_side_by_side(tmp_path, base, capsys):
    base_run, old, new = base
    assert run_cli(adapt(tmp_path / "plain", base_run, new, "--watch", old), capsys)[0] == 0
    assert run_cli(adapt(tmp_path / "replay", base_run, new, "--replay", old), capsys)[0] == 0
    runs = [tmp_path / "plain", tmp_path / "replay"]
    code, out, err = run_cli(["forgetting", *runs, "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert [r["run"] for r in rep["runs"]] == ["plain", "replay"] and rep["watched"] == ["old"]
    for r in rep["runs"]:
        d = r["domains"]["old"]
        assert d["change"] == pytest.approx(d["after"] - d["before"])
        results = json.loads((tmp_path / r["run"] / "results.json").read_text())
        assert d["after"] == results["metrics"]["watch:old"]
        assert r["curves"]["old"][0] == [0, d["before"]] and len(r["curves"]["old"]) == 1 + 3  # evals at 2, 4, 6
    code, out, err = run_cli(["forgetting", *runs, "--out", tmp_path / "report"], capsys)
    assert code == 0 and "| plain |" in out and (tmp_path / "report" / "forgetting.png").stat().st_size > 1000
    code, _, err = run_cli(["forgetting", *runs, "--out", tmp_path / "report"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["forgetting", base_run], capsys)
    assert code == 2 and "watched no text" in err
    code, _, err = run_cli(["forgetting", tmp_path / "nothing"], capsys)
    assert code == 2 and "holds no results.json" in err
