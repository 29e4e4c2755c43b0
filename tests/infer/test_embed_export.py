"""`tinygraft export` and `tinygraft embed` as command functions: a tiny pretrained run out to transformers, and
sentence embeddings of the real MiniLM to .npy / JSONL."""

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinygraft.cli.embed import run as embed_command
from tinygraft.cli.export import run as export_command
from tinygraft.errors import TinygraftError
from tinygraft.infer.embed import read_texts
from tinygraft.infer.export import export_run
from tinygraft.models import hf
from tinygraft.models.pooling import sentence_embeddings
from tinygraft.models.pretrained import describe_checkpoint, load_pretrained
from tinygraft.train import runs as run_loader
from tinygraft.train.pretrain import PretrainArgs, pretrain

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")

CORPUS = "\n".join(
    f"Line {i}: the model reads tokens, predicts the next one, and the loss falls as it learns {i % 7}."
    for i in range(200)
)
SETTINGS = [
    "data.vocab_size=300",
    "train.batch_size=2",
    "train.seq_len=16",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.warmup_steps=1",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "corpus.txt").write_text(CORPUS)
    out = {}
    for preset in ("gpt-tiny", "bert-tiny"):
        run = root / preset
        pretrain(
            PretrainArgs(
                out=str(run),
                preset=preset,
                data=str(root / "corpus.txt"),
                steps=2,
                device="cpu",
                sets=SETTINGS + (["model.n_layer=1"] if preset == "gpt-tiny" else []),
            )
        )
        out[preset] = run
    return out


@pytest.mark.parametrize("preset,hf_cls", [("gpt-tiny", "GPT2LMHeadModel"), ("bert-tiny", "BertForMaskedLM")])
def test_export_loads_in_transformers(runs, tmp_path, preset, hf_cls, capsys):
    run = runs[preset]
    assert export_command(SimpleNamespace(run=str(run), to=str(tmp_path / "hf"))) == 0
    assert "exported" in capsys.readouterr().out
    trained = run_loader.load(run)
    ref, info = getattr(transformers, hf_cls).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref.eval()
    text = "the model reads tokens and predicts"
    ids, _ = trained.tokenizer.encode_for_model(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x)[0], ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert describe_checkpoint(tmp_path / "hf")["tokenizer"]["vocab_size"] == trained.tokenizer.vocab_size


def test_export_refuses_a_non_empty_target(runs, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(TinygraftError, match="is not empty; pass --overwrite"):
        export_run(runs["gpt-tiny"], tmp_path)
    export_run(runs["gpt-tiny"], tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine" and hf.is_hf_dir(tmp_path)


@pytest.fixture(scope="module")
def minilm():
    try:
        return load_pretrained("minilm")
    except TinygraftError as e:
        pytest.skip(str(e))


SENTENCES = ["A man is playing a guitar.", "", "Someone plays an instrument.", "The stock market fell sharply today."]


def test_embed_to_npy_and_jsonl(minilm, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    texts = [s for s in SENTENCES if s]
    want = sentence_embeddings(minilm.model, minilm.tokenizer, texts, minilm.pooling)  # normalised (modules.json)
    args = SimpleNamespace(
        from_="minilm", input=str(tmp_path / "in.txt"), output=str(tmp_path / "e.npy"), normalize=None, device="cpu"
    )
    assert embed_command(args) == 0
    got = np.load(tmp_path / "e.npy")
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert got[0] @ got[1] > got[0] @ got[2]  # the two guitar sentences are closest

    args.output, args.normalize = str(tmp_path / "e.jsonl"), False
    assert embed_command(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    raw = np.array([r["embedding"] for r in rows])
    assert np.linalg.norm(raw[0]) > 1.5  # not normalised
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TinygraftError, match="already exists; pass --overwrite"):
        embed_command(args)


def test_embed_from_stdin_jsonl_and_from_a_run(runs, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO("first line\n\nsecond line\n"))
    assert read_texts("-") == ["first line", "second line"]
    (tmp_path / "in.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_texts(tmp_path / "in.jsonl") == ["one", "two"]
    monkeypatch.setattr("sys.stdin", io.StringIO("the model reads tokens\nthe loss falls\n"))
    assert embed_command(SimpleNamespace(from_=str(runs["bert-tiny"]), input="-", output=None, normalize=True)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and len(rows[0]["embedding"]) == 128
    assert abs(np.linalg.norm(rows[0]["embedding"]) - 1) < 1e-5


def test_embed_bad_input(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(TinygraftError, match="holds no text to embed"):
        read_texts(tmp_path / "blank.txt")
    with pytest.raises(TinygraftError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(TinygraftError, match="line 1 of .* has no string field 'text'"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "ok.txt").write_text("hello\n")
    args = SimpleNamespace(from_="minilm", input=str(tmp_path / "ok.txt"), output=str(tmp_path / "out.csv"))
    with pytest.raises(TinygraftError, match="must end in .npy or .jsonl"):
        embed_command(args)
    with pytest.raises(TinygraftError, match="does not exist"):
        embed_command(SimpleNamespace(from_=str(tmp_path / "nowhere"), input=str(tmp_path / "ok.txt")))
