"""What `tinygraft advise` measures, each on hand-made data where the answer is known, and one whole advise run on a
tiny BERT (analysis/advise.py, advise_report.py, cli/advise.py)."""

import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinygraft.analysis import advise as V
from tinygraft.cli import advise as A
from tinygraft.cli.main import build_parser, main
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.models.gpt import GPT, GPTConfig

from ..train.finetune_fixtures import make_env

ENGLISH = [f"the module logs message {i} and returns a small value to the caller" for i in range(60)]


@pytest.fixture(scope="module")
def wordpiece():
    return TextTokenizer.train(ENGLISH * 3, "wordpiece", 300)


# ------------------------------------------------------------------------------------------------------ the data
def test_unknown_heavy_text_shows_in_the_unknown_rate_and_the_pieces(wordpiece):
    alien = ["жжж ддд"] * 10  # characters the tokenizer never saw: one unknown token per word
    f = V.fragmentation(alien, wordpiece)
    assert f["words"] == 20 and f["unk_rate"] == 1.0 and f["pieces_per_word"] == 1.0
    english = V.fragmentation(ENGLISH[:10], wordpiece)
    assert english["unk_rate"] == 0.0
    pieces = sum(len(wordpiece.encode(t)) for t in ENGLISH[:10])
    assert english["pieces_per_word"] == pytest.approx(pieces / sum(len(t.split()) for t in ENGLISH[:10]))
    mixed = V.fragmentation([ENGLISH[0], "жжж ддд"], wordpiece)
    own = len(wordpiece.encode(ENGLISH[0]))
    assert mixed["unk_rate"] == pytest.approx(2 / (own + 2))


def labeled(labels) -> list:
    return [SimpleNamespace(text=f"text {i}", label=y) for i, y in enumerate(labels)]


def test_label_counts_and_balance_of_a_balanced_and_an_unbalanced_set(wordpiece):
    even = V.data_report(labeled(["a", "b"] * 5), wordpiece, 64, 32)
    assert even["per_class"] == {"a": 5, "b": 5} and even["balance"] == 1.0 and even["examples"] == 10
    skewed = V.data_report(labeled(["a"] * 8 + ["b"] * 2), wordpiece, 64, 32)
    assert list(skewed["per_class"].items()) == [("a", 8), ("b", 2)] and skewed["balance"] == 0.25
    assert V.label_counts(labeled([[1, 2], [2]])) == {"2": 2, "1": 1}  # multi-label: each label of each example
    assert V.label_counts(labeled([0.5, 1.5])) is None  # a regression score has no classes


def test_length_stats_against_max_length_and_positions():
    s = V.length_stats(list(range(1, 101)), positions=64, max_length=50)
    assert s["over_max_length"] == 0.5 and s["over_positions"] == 0.36 and s["tokens_max"] == 100
    assert s["tokens_p50"] == pytest.approx(50.5) and s["positions"] == 64 and s["max_length"] == 50


# ---------------------------------------------------------------------------------------------------- the domain
@pytest.fixture(scope="module")
def trained_gpt():
    """A one-block GPT trained until it knows ENGLISH well: its loss there is low, on shuffled words high."""
    torch.manual_seed(0)
    tok = TextTokenizer.train(ENGLISH * 3, "bpe", 300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    stream = V.token_stream(ENGLISH * 4, tok, 10_000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(stream) - 33, (16,), generator=g)
        x = torch.stack([torch.from_numpy(stream[s : s + 32]) for s in starts.tolist()])
        y = torch.stack([torch.from_numpy(stream[s + 1 : s + 33]) for s in starts.tolist()])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def reference_loss(model, tokens: np.ndarray, seq: int) -> float:
    """Next-token cross-entropy over the non-overlapping windows of `tokens`, in float64."""
    n = (len(tokens) - 1) // seq
    x = torch.stack([torch.from_numpy(tokens[i * seq : i * seq + seq]) for i in range(n)])
    y = torch.stack([torch.from_numpy(tokens[i * seq + 1 : i * seq + seq + 1]) for i in range(n)])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0].double(), dim=-1)
    return float(-logp.gather(-1, y.unsqueeze(-1)).mean())


def test_lm_loss_is_the_mean_next_token_cross_entropy(trained_gpt):
    model, tok = trained_gpt
    tokens = V.token_stream(ENGLISH[:20], tok)
    got = V.lm_loss(model, "gpt", tokens, tok, 32, torch.device("cpu"))
    assert got == pytest.approx(reference_loss(model, tokens, 32), rel=1e-5)


def test_the_lm_gap_shows_on_text_unlike_the_models_and_not_on_its_own(trained_gpt):
    model, tok = trained_gpt
    rng = np.random.default_rng(0)
    words = " ".join(ENGLISH).split()
    shuffled = [" ".join(rng.permutation(words)[:12]) for _ in range(60)]  # the same words, in no learned order
    loaded = SimpleNamespace(model=model)
    far = V.domain_report(shuffled, ENGLISH, loaded, tok, 32, torch.device("cpu"))
    assert far["lm_loss"] > far["reference_lm_loss"] + 1.0
    assert len(far["gap"]) == 1 and "LM loss" in far["gap"][0]
    near = V.domain_report(ENGLISH[::-1], ENGLISH, loaded, tok, 32, torch.device("cpu"))
    assert abs(near["lm_loss"] - near["reference_lm_loss"]) < 0.5 and near["gap"] == []


# ------------------------------------------------------------------------------------------------------ the whole
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("advise"))


def test_advise_measures_recommends_and_prints_commands_the_cli_takes(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "advise"
    args = ["advise", "--from", env["bert"], "--train", env["train"], "--val", env["val"], "--max-length", 32,
            "--batch-size", 8, "--label-text", "logging=logging messages", "--out", out, "--json"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report == json.loads((out / "advice.json").read_text())
    assert (out / "advice.md").read_text().startswith("## advise: classify") and (out / "advice.png").stat().st_size
    d = report["data"]
    assert d["examples"] == 48 and sum(d["per_class"].values()) == 48 and set(d["per_class"]) == {"logging", "asyncio"}
    assert report["domain"]["lm_loss"] is None and "no LM head" in report["domain"]["lm_note"]
    assert set(report["scores"]) == {"zero-shot", "linear-probe", "lora"}  # LoRA's trial: 17 epochs of 6 steps
    assert report["trial"]["epochs"] == 17 and Path(report["trial"]["run"], "results.json").is_file()
    assert all(0.0 <= v <= 1.0 for v in report["scores"].values())
    assert set(report["costs"]) == {"full", "lora", "linear-probe"}
    assert report["costs"]["linear-probe"]["unit"] == "example"  # the probe's cost is its fit: no timed probe run
    assert not (out / "runs" / "linear-probe-timed").exists()
    assert all(c["step_seconds"] > 0 and c["peak_mb"] > 0 and c["fits"] for c in report["costs"].values())
    a = report["advice"]
    assert a["method"] in ("zero-shot", "linear-probe", "lora") and "fewer than 100" in a["branch"]  # 48 examples
    assert a["train_epochs"] == 17  # 6 steps of 8 an epoch: at least 100 steps take 17 epochs
    for name, line in report["commands"].items():
        argv = shlex.split(line)
        if name == "predict":
            assert argv[2] == report["trial"]["run"]
            continue
        assert argv[:2] == ["tinygraft", name]
        ns = build_parser().parse_args(argv[1:])
        assert getattr(ns, "data.train") == str(env["train"]) and getattr(ns, "data.max_length") == 32
        assert ("--label-text" in line) == (name == "compare" or a["method"] == "zero-shot")
    compare = build_parser().parse_args(shlex.split(report["commands"]["compare"])[1:])
    assert compare.methods == "zero-shot,linear-probe,lora,full" and getattr(compare, "train.epochs") == 17
    assert getattr(compare, "method_settings.label_text") == "logging=logging messages"
    # the measuring runs are reused by a second advise with the same settings: same scores, no new runs; --run
    # then starts the compare it printed
    stamp = {p: p.stat().st_mtime for p in (out / "runs").glob("*/results.json")}
    started = []
    monkeypatch.setattr(A.subprocess, "run", lambda argv, check: started.append(argv) or SimpleNamespace(returncode=0))
    assert main([str(a) for a in [*args, "--run"]]) == 0
    assert started == [[sys.executable, "-m", "tinygraft", *shlex.split(report["commands"]["compare"])[1:]]]
    again = json.loads(capsys.readouterr().out)
    assert again["scores"] == report["scores"]
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/results.json")} == stamp


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--budget-minutes", "0"], "--budget-minutes must be a positive number"),
        (["--set", "method_settings.lora_r=4"], "method settings as flags"),
    ],
)
def test_advise_refuses_bad_input_in_one_sentence(env, tmp_path, capsys, extra, words):
    args = ["advise", "--from", env["bert"], "--train", env["train"], "--out", tmp_path / "a", *extra]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_pretrain_command_reads_the_texts_advise_wrote(tmp_path):
    from tinygraft.analysis import advise_report as R  # noqa: PLC0415

    advice = {"method": "lora", "lr": 1e-3, "epochs": 3, "train_epochs": 3, "pretrain_first": True}
    report = {"source": "minilm", "scores": {}, "steps_per_epoch": 4, "domain": {"lm_loss": None}, "advice": advice}
    cmds = R.commands(report, ["--train", "t.tsv"], {"label_text": ["--label-text", "a=b"]}, Path("runs/advise"))
    pre = build_parser().parse_args(shlex.split(cmds["pretrain"])[1:])
    assert pre.from_ == "minilm" and pre.new_head and pre.data == "runs/advise/domain.txt"
    fine = build_parser().parse_args(shlex.split(cmds["finetune"])[1:])
    assert fine.source == "runs/advise/domain" and fine.method == "lora" and getattr(fine, "train.lr") == 1e-3
    assert "--label-text" not in cmds["finetune"]  # LoRA takes no label text; compare's zero-shot would
    assert "--label-text" not in cmds["compare"]  # (no zero-shot score, so no zero-shot in this compare)


def test_a_pick_that_trains_nothing_gets_no_rate_or_epochs():
    from tinygraft.analysis import advise_report as R  # noqa: PLC0415

    advice = {"method": "zero-shot", "lr": None, "epochs": 1, "train_epochs": 20, "pretrain_first": False}
    report = {"source": "minilm", "scores": {"zero-shot": 0.7}, "steps_per_epoch": 2, "domain": {"lm_loss": None},
              "advice": advice}  # fmt: skip
    cmds = R.commands(report, ["--train", "t.tsv"], {"label_text": ["--label-text", "a=b"]}, Path("runs/advise"))
    fine = build_parser().parse_args(shlex.split(cmds["finetune"])[1:])
    assert fine.method == "zero-shot" and "--lr" not in cmds["finetune"] and "--label-text" in cmds["finetune"]
    assert "--epochs 20 --eval-every 8" in cmds["compare"]
