"""`tinygraft compare` on a tiny pretrained BERT: one process per method and seed, the same data and steps, each
method at its own learning rate, the table / JSON / chart, reuse of finished runs, and bad input."""

import json

import pytest

from tests.train.finetune_fixtures import make_bert_dir, make_data
from tinygraft.cli.main import main
from tinygraft.core.config import to_dict
from tinygraft.train.compare import child_config, mean_std, parse_lr_for
from tinygraft.train.config import resolve_finetune
from tinygraft.train.methods import default_lr

DEFAULT_LR = {m: default_lr(m) for m in ("full", "linear-probe", "top-1")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    data = make_data(root)
    texts = [ln.split("\t")[0] for ln in data["train"].read_text().splitlines()[1:]]
    return {"bert": make_bert_dir(root, texts * 3), **data}


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def base(env, out):
    return [
        "compare",
        "--from",
        env["bert"],
        "--train",
        env["train"],
        "--val",
        env["val"],
        "--out",
        out,
        "--steps",
        2,
        "--batch-size",
        8,
        "--max-length",
        32,
        "--threads",
        1,
    ]


def test_compare_table_json_chart_and_reuse(env, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, o, err = run(
        [*base(env, out), "--methods", "full,linear-probe,top-1", "--seeds", "0", "--lr-for", "top-1=2e-4"], capsys
    )
    assert code == 0, err
    report = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["full", "linear-probe", "top-1"]
    assert rows["full"]["lr"] == DEFAULT_LR["full"] and rows["linear-probe"]["lr"] == DEFAULT_LR["linear-probe"]
    assert rows["top-1"]["lr"] == 2e-4
    assert {r["steps"] for r in rows.values()} == {2}
    assert rows["linear-probe"]["trainable_params"] == 32 * 2 + 2
    assert rows["full"]["trainable_pct"] == 100.0
    assert (
        rows["linear-probe"]["optimizer_state_mb"]
        < rows["top-1"]["optimizer_state_mb"]
        < rows["full"]["optimizer_state_mb"]
    )
    tokens = {json.loads((out / m / "seed-0" / "results.json").read_text())["tokens_seen"] for m in rows}
    assert len(tokens) == 1  # the same batches for every method
    md = (out / "compare.md").read_text()
    assert "| linear-probe |" in md and "accuracy (mean ± std, n)" in md and (out / "compare.png").is_file()
    assert "| top-1 |" in o

    first = (out / "full" / "seed-0" / "results.json").stat().st_mtime_ns
    code, _, err = run([*base(env, out), "--methods", "full,linear-probe", "--seeds", "0,1"], capsys)
    assert code == 0, err
    assert (out / "full" / "seed-0" / "results.json").stat().st_mtime_ns == first  # finished runs are reused
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    full = rows["full"]
    assert full["seeds"] == [0, 1] and full["std"] == pytest.approx(mean_std(full["values"])[1])


def test_a_finished_run_is_not_reused_when_its_flags_or_data_changed(env, tmp_path, capsys):
    """Issue 14's repro: the same OUT with another budget and another training file used to show the first run's
    numbers under the new title."""
    out = tmp_path / "cmp"
    args = [*base(env, out), "--methods", "linear-probe", "--seeds", "0"]
    assert run(args, capsys)[0] == 0
    first = json.loads((out / "linear-probe" / "seed-0" / "results.json").read_text())
    bigger = [a if a != 2 else 3 for a in args]  # --steps 3
    assert run(bigger, capsys)[0] == 0
    again = json.loads((out / "linear-probe" / "seed-0" / "results.json").read_text())
    assert first["steps"] == 2 and again["steps"] == 3
    other = tmp_path / "other.tsv"
    lines = env["train"].read_text().splitlines()
    other.write_text("\n".join(lines[:1] + lines[1:][::-1][:30]) + "\n")  # other rows, other order
    changed = [other if a == env["train"] else a for a in bigger]
    assert run(changed, capsys)[0] == 0
    third = json.loads((out / "linear-probe" / "seed-0" / "results.json").read_text())
    assert third["n_train"] == 30 != again["n_train"]
    report = json.loads((out / "compare.json").read_text())
    assert report["rows"][0]["values"] == [third["metrics"][third["metric"]]]


def test_compare_resumes_a_run_stopped_part_way_with_its_own_flags(env, tmp_path, capsys):
    """A run compare started and Ctrl-C stopped at step 1 goes on from its checkpoint (and ends where a straight run
    ends); a stopped run with other flags (another lr) is started over."""
    straight, out = tmp_path / "straight", tmp_path / "cmp"
    assert run([*base(env, straight), "--methods", "full,top-1", "--seeds", "0"], capsys)[0] == 0
    as_compare = ["finetune", "--from", env["bert"], "--train", env["train"], "--val", env["val"], "--steps", 2,
                  "--batch-size", 8, "--max-length", 32, "--seed", 0, "--stop-at", 1]  # fmt: skip
    lr_full = repr(DEFAULT_LR["full"])
    assert run([*as_compare, "--method", "full", "--lr", lr_full, "--out", out / "full" / "seed-0"], capsys)[0] == 0
    assert run([*as_compare, "--method", "top-1", "--lr", "0.5", "--out", out / "top-1" / "seed-0"], capsys)[0] == 0
    code, _, err = run([*base(env, out), "--methods", "full,top-1", "--seeds", "0"], capsys)
    assert code == 0, err
    assert "resuming" in (out / "logs" / "full-seed-0.log").read_text()
    assert "resuming" not in (out / "logs" / "top-1-seed-0.log").read_text()
    for m in ("full", "top-1"):
        a, b = (json.loads((d / m / "seed-0" / "results.json").read_text()) for d in (straight, out))
        assert b["status"] == "completed" and b["step"] == 2 and b["lr"] == a["lr"]
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-5)


def test_compare_bad_input_is_one_sentence_exit_2(env, tmp_path, capsys):
    out = tmp_path / "bad"
    code, _, err = run([*base(env, out), "--methods", "full,bogus"], capsys)
    assert code == 2 and "unknown method 'bogus'" in err and not out.exists()
    code, _, err = run([*base(env, out), "--methods", "full", "--lr-for", "lora=1e-3"], capsys)
    assert code == 2 and "not in --methods" in err
    code, _, err = run([*base(env, out), "--methods", "full", "--seeds", "a,b"], capsys)
    assert code == 2 and "integers" in err
    code, _, err = run([*base(env, out), "--methods", "full", "--text-col", "sentence"], capsys)
    assert code == 2 and "the full run (seed 0) failed" in err and "has no column 'sentence'" in err


def test_child_configs_and_lr_for():
    """Each (method, seed) run gets the shared settings with its own method, seed and lr, and of the method flags
    given only those of its method."""
    cfg = resolve_finetune(
        None, None, {"source": "m", "data.train": "t.tsv", "data.max_length": 64, "data.quote_none": True}, None
    )
    given = {"r": 4, "top_k": 1}
    lora = child_config(cfg, "lora", 3, 1e-3, given)
    assert (lora.method, lora.train.seed, lora.train.lr, lora.method_settings.r) == ("lora", 3, 1e-3, 4)
    top = child_config(cfg, "top-1", 3, 1e-4, given)
    assert top.method_settings.top_k == 1 and not hasattr(top.method_settings, "r")
    shared = ("source", "task", "data", "task_settings")
    assert all(to_dict(lora)[k] == to_dict(top)[k] == to_dict(cfg)[k] for k in shared)
    assert to_dict(lora)["data"]["max_length"] == 64 and to_dict(lora)["data"]["quote_none"] is True
    assert parse_lr_for(["lora=1e-3", "full=5e-5"]) == {"lora": 1e-3, "full": 5e-5}
    for bad in ("lora", "lora=x", "lora=-1"):
        with pytest.raises(Exception, match="METHOD=LR"):
            parse_lr_for([bad])
