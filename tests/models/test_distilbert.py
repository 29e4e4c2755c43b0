"""DistilBERT files as transformers writes them, read into our BERT (no token types, no pooler, its own module and
config names) and written back, against transformers itself: every layer on a padded batch, the masked-LM logits,
the settings we refuse, and `finetune --from` a DistilBERT out to DistilBERT."""

import json

import pytest
import torch

from tests.train.finetune_fixtures import make_data
from tinygraft.cli.main import main
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, BERTConfig, BERTForMaskedLM, hf
from tinygraft.models.pretrained import describe_checkpoint
from tinygraft.train import runs

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")

P = 40
TEXTS = [
    "DistilBERT keeps half of BERT's layers and drops the token types.",
    "Its attention names its projections q_lin, k_lin, v_lin and out_lin.",
    "The pooler is gone; a classifier reads the first token instead.",
] * 4

pytestmark = pytest.mark.usefixtures("one_thread")


def distil_config(vocab: int, **kw):
    cfg = dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=P)
    return transformers.DistilBertConfig(**{**cfg, **kw})


def hf_model(cls, config):
    torch.manual_seed(1)
    model = cls(config).eval()
    with torch.no_grad():  # fresh LayerNorms are identity and biases zero: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """DistilBertModel and DistilBertForMaskedLM directories with a WordPiece tokenizer (DistilBERT's is BERT's)."""
    tok = TextTokenizer.train(TEXTS, "wordpiece", 200)
    out = {"tokenizer": tok}
    for name, cls in [("model", transformers.DistilBertModel), ("mlm", transformers.DistilBertForMaskedLM)]:
        model = hf_model(cls, distil_config(tok.vocab_size, pad_token_id=tok.pad_id))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        for file, text in hf.tokenizer_files(tok, P).items():
            (path / file).write_text(text, encoding="utf-8")
        out[name] = (model, path)
    return out


def padded_batch(vocab: int, pad: int = 0):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 1:] = 0, 0
    ids[mask == 0] = pad
    return ids, mask


def close(got, want):
    """fp32 agreement: 1e-5 of the reference's scale (the two sum the same terms in other orders)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


# ------------------------------------------------------------------------------------------------------ in
def test_every_layer_matches_on_a_padded_batch(saved):
    ref, path = saved["model"]
    model = BERT.from_pretrained(path)
    cfg = model.config
    assert (cfg.hf_model_type, cfg.type_vocab_size, cfg.n_embd, cfg.intermediate_size) == ("distilbert", 0, 64, 37)
    assert model.pooler is None and model.embeddings.token_type_embeddings is None
    assert model.load_report.missing_heads == []  # DistilBERT has no pooler to miss
    ids, mask = padded_batch(cfg.vocab_size)
    types = torch.ones_like(ids)  # a BERT tokenizer's segment ids: DistilBERT reads none
    with torch.no_grad():
        out = model(ids, mask, types, output_hidden_states=True)
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(want.hidden_states) == 3
    real = mask.bool()
    for got, exp in zip(out.hidden_states, want.hidden_states):
        close(got[real], exp[real])
    close(out.pooled, want.last_hidden_state[:, 0])


def test_masked_lm_logits_match(saved):
    ref, path = saved["mlm"]
    model = BERTForMaskedLM.from_pretrained(path)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        close(model(ids, mask)[0][mask.bool()], want[mask.bool()])
    encoder = BERT.from_pretrained(path)  # `distilbert.` stripped, the vocab_* head reported unused
    assert {"vocab_transform.weight", "vocab_projector.bias"} <= set(encoder.load_report.unused_tensors)
    with pytest.raises(TinygraftError, match=r"no masked-LM head \(vocab_transform.\*\)"):
        BERTForMaskedLM.from_pretrained(saved["model"][1])
    info = describe_checkpoint(path)
    assert info["architectures"] == ["DistilBertForMaskedLM"] and info["heads"] == {"pooler": False, "masked_lm": True}


# ------------------------------------------------------------------------------------------------------ out
@pytest.mark.parametrize(
    "name,cls,hf_cls", [("model", BERT, "DistilBertModel"), ("mlm", BERTForMaskedLM, "DistilBertForMaskedLM")]
)
def test_ours_saved_loads_in_transformers(saved, tmp_path, name, cls, hf_cls):
    _, path = saved[name]
    model = cls.from_pretrained(path)
    with torch.no_grad():  # move every tensor off the file's values so a lost one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "out", saved["tokenizer"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["architectures"] == [hf_cls]
    assert (config["dim"], config["n_layers"], config["hidden_dim"], config["activation"]) == (64, 2, 37, "gelu")
    assert config["sinusoidal_pos_embds"] is False and "type_vocab_size" not in config
    back, info = getattr(transformers, hf_cls).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    ids, mask = padded_batch(model.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        want = back.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        if cls is BERT:
            for g, w in zip(model(ids, mask, output_hidden_states=True).hidden_states, want.hidden_states):
                close(g[real], w[real])
        else:
            close(model(ids, mask)[0][real], want.logits[real])


def test_a_pooler_has_no_place_in_distilbert(tmp_path):
    cfg = BERTConfig(vocab_size=50, max_position_embeddings=16, type_vocab_size=0, n_layer=1, n_head=2, n_embd=32,
                     intermediate_size=40, hf_model_type="distilbert")  # fmt: skip
    with pytest.raises(TinygraftError, match="the DistilBERT layout has no place for tensor 'pooler.dense.weight'"):
        BERT(cfg).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TinygraftError, match="a distilbert model has no token types"):
        BERTConfig(vocab_size=50, n_embd=32, n_head=2, hf_model_type="distilbert")


# ----------------------------------------------------------------------------------------------- refused
def edited(path, tmp_path, **change):
    out = tmp_path / "edited"
    out.mkdir()
    for f in path.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **change}))
    return out


@pytest.mark.parametrize(
    "change,match",
    [
        ({"sinusoidal_pos_embds": True}, r"sets sinusoidal_pos_embds=True \(fixed sinusoidal position embeddings\)"),
        ({"activation": "relu"}, "sets activation='relu', an activation tinygraft does not implement here"),
        ({"tie_word_embeddings": False}, "sets tie_word_embeddings=False"),
    ],
)
def test_settings_we_lack_are_refused_by_name(saved, tmp_path, change, match):
    with pytest.raises(TinygraftError, match=match):
        BERT.from_pretrained(edited(saved["mlm"][1], tmp_path, **change))


# ----------------------------------------------------------------------------------------------- a run
def test_finetune_from_distilbert_exports_distilbert(saved, tmp_path, capsys):
    data = make_data(tmp_path)
    run = tmp_path / "run"
    args = ["finetune", "--from", saved["model"][1], "--out", run, "--train", data["train"], "--val", data["val"],
            "--steps", 2, "--batch-size", 8, "--max-length", 24, "--eval-every", 2]  # fmt: skip
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert "as DistilBertModel" in capsys.readouterr().out
    back, info = transformers.DistilBertModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    ours = runs.load(run).model.backbone
    ids, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        want = back.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        close(ours(ids, mask).last_hidden_state[mask.bool()], want[mask.bool()])
