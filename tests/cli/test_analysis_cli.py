"""`tinygraft cka` and `tinygraft probe` as a user types them, on tiny pre-training runs: the table, --json, the
files, and each refusal as one sentence with exit code 2."""

import json

import pytest

from tests.cli.tiny_runs import TINY, run_cli, write_corpus
from tests.train.finetune_fixtures import demo_rows, make_bert_dir, make_data, make_gpt_dir
from tinygraft.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU (tests/conftest.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two seeds of the one-layer GPT on one corpus (so one tokenizer), a BERT and a GPT of other tokenizers, the
    fine-tuning fixtures' data, and a text file."""
    root = tmp_path_factory.mktemp("analysis")
    corpus = write_corpus(root / "corpus.txt")
    for seed in (0, 1):
        args = ["pretrain", "--out", root / f"seed{seed}", "--data", corpus, *TINY, "--steps", 2, "--seed", seed]
        assert main([str(a) for a in args]) == 0
    texts = [t for t, _ in demo_rows()[0][:200]]
    make_bert_dir(root, texts)
    make_gpt_dir(root, texts)
    make_data(root)
    (root / "texts.txt").write_text("\n".join(texts[:20]) + "\n", encoding="utf-8")
    (root / "three.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    return root


def refused(code: int, err: str) -> str:
    """The refusal's sentence, after checking it is one line of `error: ...` and no traceback."""
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cka_prints_the_diagonal_and_writes_the_heatmap(root, capsys):
    a, b, data = root / "seed0", root / "seed1", root / "texts.txt"
    code, out, _ = run_cli(["cka", a, b, "--data", data, "--batch-size", 7], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert "20 texts" in lines[0] and lines[1].split() == ["layer", "debiased", "CKA", "biased", "CKA", "SVCCA"]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1"]  # the embeddings and the one block
    code, out, _ = run_cli(["cka", a, a, "--data", data, "--tokens", "--json", "--out", root / "cka"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["features"] == "tokens" and report["rows"] > report["texts"] == 20
    assert len(report["cka_debiased"]) == len(report["cka_debiased"][0]) == 2
    assert all(row["cka_debiased"] == pytest.approx(1.0, abs=1e-9) for row in report["diagonal"])  # A against A
    assert json.loads((root / "cka" / "cka.json").read_text()) == report
    assert (root / "cka" / "cka.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(["cka", a, a, "--data", data, "--out", root / "cka"], capsys)
    assert "already exists; pass --overwrite" in refused(code, err)
    code, _, err = run_cli(["cka", a, a, "--data", data, "--png", root / "x.jpg"], capsys)
    assert "must end in .png" in refused(code, err)


@pytest.mark.parametrize(
    "other,data,sentence",
    [
        (
            "tiny-bert",
            "texts.txt",
            "is a GPT and '{root}/tiny-bert' a BERT; cka compares two checkpoints of one family",
        ),
        ("tiny-gpt", "texts.txt", "have different tokenizers, so their inputs do not line up"),
        ("seed1", "missing.txt", "input file '{root}/missing.txt' does not exist"),
        (
            "seed1",
            "three.txt",
            "cka needs at least 4 texts (the debiased estimator's least); '{root}/three.txt' gives 3",
        ),
    ],
)
def test_cka_refusals(root, capsys, other, data, sentence):
    code, _, err = run_cli(["cka", root / "seed0", root / other, "--data", root / data], capsys)
    assert sentence.format(root=root) in refused(code, err)


def test_probe_classify_and_tokens(root, capsys):
    run, train, val = root / "seed0", root / "train.tsv", root / "val.tsv"
    code, out, _ = run_cli(["probe", run, "--train", train, "--val", val, "--batch-size", 5], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert "majority class" in lines[0] and lines[1].split() == ["layer", "val", "acc", "train", "acc", "majority"]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1"]
    args = ["probe", run, "--task", "tokens", "--train", root / "tags.conll", "--val", root / "tags.conll"]
    code, out, _ = run_cli([*args, "--json", "--png", root / "probe" / "tokens.png"], capsys)
    assert code == 0
    report = json.loads(out)
    assert [r["layer"] for r in report["layers"]] == [0, 1] and "selectivity" in report["layers"][0]
    assert json.loads((root / "probe" / "tokens.json").read_text()) == report
    assert (root / "probe" / "tokens.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "extra,sentence",
    [
        (["--val", "{root}/missing.tsv"], "data file '{root}/missing.tsv' does not exist"),
        (["--val", "{root}/val.tsv", "--text-col", "body"], "has no column 'body' (columns found: text, label)"),
        (["--val", "{root}/val.tsv", "--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_probe_refusals(root, capsys, extra, sentence):
    args = ["probe", root / "seed0", "--train", root / "train.tsv", *[e.format(root=root) for e in extra]]
    code, _, err = run_cli(args, capsys)
    assert sentence.format(root=root) in refused(code, err)
