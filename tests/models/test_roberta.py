"""RoBERTa files as transformers writes them, read into our BERT and written back, against transformers itself: every
layer on a padded batch (RoBERTa numbers positions past the padding id, so pads exercise it), the masked-LM logits,
its byte-level BPE tokenizer and template, the settings we refuse, and `finetune --from` a RoBERTa out to RoBERTa."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tests.train.finetune_fixtures import make_data
from tinygraft.cli.main import main
from tinygraft.data.batching import MLMBatcher
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, BERTConfig, BERTForMaskedLM
from tinygraft.models.pretrained import describe_checkpoint, load_pretrained
from tinygraft.train import runs

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")

P = 40  # positions a sequence may use; the config says P + pad + 1
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "RoBERTa reads bytes, so every string has an encoding.",
    "Padding sits at its own position; real tokens count from two.",
    "A sentence pair is joined by two separators.",
] * 4

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_tokenizer():
    """A byte-level BPE with RoBERTa's specials and post-processor, as RobertaTokenizerFast saves it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return transformers.RobertaTokenizerFast(tokenizer_object=tok)


def roberta_config(vocab: int, **kw):
    cfg = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=P + 2, type_vocab_size=1, layer_norm_eps=1e-5)  # fmt: skip
    return transformers.RobertaConfig(**{**cfg, **kw})


def hf_model(cls, config, **kw):
    torch.manual_seed(1)
    model = cls(config, **kw).eval()
    with torch.no_grad():  # fresh LayerNorms are identity and biases zero: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """RobertaModel (with and without its pooler) and RobertaForMaskedLM directories, each with the tokenizer."""
    tok = hf_tokenizer()
    out = {"tokenizer": tok}
    for name, cls, kw in [
        ("model", transformers.RobertaModel, {}),
        ("no-pooler", transformers.RobertaModel, {"add_pooling_layer": False}),
        ("mlm", transformers.RobertaForMaskedLM, {}),
    ]:
        model = hf_model(cls, roberta_config(len(tok)), **kw)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = (model, path)
    return out


def padded_batch(vocab: int, pad: int = 1):
    """Right-padded rows, one left-padded row, one full row: pads take position pad_token_id, real tokens count on."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    for row, (lo, hi) in enumerate([(0, 11), (0, 6), (0, 1), (4, 11)]):
        mask[row, :lo], mask[row, hi:] = 0, 0
    ids[mask == 0] = pad
    return ids, mask


def close(got, want):
    """fp32 agreement: 1e-5 of the reference's scale (the two sum the same terms in other orders)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


# ------------------------------------------------------------------------------------------------------ in
def test_every_layer_and_the_pooler_match_on_a_padded_batch(saved):
    ref, path = saved["model"]
    model = BERT.from_pretrained(path)
    cfg = model.config
    assert (cfg.hf_model_type, cfg.position_offset, cfg.max_position_embeddings, cfg.type_vocab_size) == (
        "roberta", 2, P, 1)  # fmt: skip
    ids, mask = padded_batch(cfg.vocab_size)
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(want.hidden_states) == 3
    for got, exp in zip(out.hidden_states, want.hidden_states):
        close(got, exp)  # every position, pads too: their position row is the padding one in both
    close(out.pooled, want.pooler_output)


def test_masked_lm_logits_match(saved):
    ref, path = saved["mlm"]
    model = BERTForMaskedLM.from_pretrained(path)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        close(model(ids, mask)[0], ref(input_ids=ids, attention_mask=mask).logits)
    found = load_pretrained(path, with_tokenizer=False).model  # a file with the head comes back as the masked LM
    assert isinstance(found, BERTForMaskedLM)


def test_files_without_a_pooler_and_the_mlm_file_as_an_encoder(saved):
    ref, path = saved["no-pooler"]
    model = BERT.from_pretrained(path)
    assert model.pooler is None and model.load_report.missing_heads == ["pooler"]
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        close(model(ids, mask).last_hidden_state, ref(input_ids=ids, attention_mask=mask).last_hidden_state)
    mref, mpath = saved["mlm"]
    encoder = BERT.from_pretrained(mpath)  # `roberta.` prefix stripped, lm_head.* reported unused
    assert any(n.startswith("lm_head.") for n in encoder.load_report.unused_tensors)
    with torch.no_grad():
        want = mref.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        close(encoder(ids, mask).last_hidden_state, want)
    with pytest.raises(TinygraftError, match=r"no masked-LM head \(lm_head.dense.\*\)"):
        BERTForMaskedLM.from_pretrained(path)
    info = describe_checkpoint(mpath)
    assert info["family"] == "bert" and info["architectures"] == ["RobertaForMaskedLM"]
    assert info["heads"] == {"pooler": False, "masked_lm": True} and info["tokenizer"]["kind"] == "bpe"


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_finds_robertas_specials_and_template(saved):
    ref = saved["tokenizer"]
    tok = TextTokenizer.load(saved["model"][1])
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.kind == "bpe" and tok.n_special(pair=False) == 2 and tok.n_special(pair=True) == 4
    a, b = TEXTS[0], TEXTS[1]
    ids, types = tok.encode_for_model(a)
    assert ids == ref(a)["input_ids"] and types == [0] * len(ids)
    ids, types = tok.encode_for_model(a, b)
    assert ids == ref(a, b)["input_ids"] and types == [0] * len(ids)  # <s> a </s></s> b </s>
    assert ids[len(tok.encode(a)) + 1 : len(tok.encode(a)) + 3] == [2, 2]
    cut = ref(a, b, truncation=True, max_length=12)["input_ids"]
    assert tok.encode_for_model(a, b, max_length=12)[0] == cut
    # masked-LM batches: <s> chunk </s>, <mask> where chosen, pads as <pad>
    stream = np.array((tok.encode(" ".join(TEXTS)) + [tok.separator_id]) * 4)
    batch = MLMBatcher(stream, batch_size=8, seq_len=16, tokenizer=tok, seed=0).next()
    assert (batch["input_ids"][:, 0] == 0).all() and (batch["input_ids"] == 4).any()
    assert set(batch["input_ids"][batch["attention_mask"] == 0].tolist()) <= {1}


# ------------------------------------------------------------------------------------------------------ out
@pytest.mark.parametrize(
    "name,cls,hf_cls", [("model", BERT, "RobertaModel"), ("mlm", BERTForMaskedLM, "RobertaForMaskedLM")]
)
def test_ours_saved_loads_in_transformers(saved, tmp_path, name, cls, hf_cls):
    _, path = saved[name]
    model = cls.from_pretrained(path)
    with torch.no_grad():  # move every tensor off the file's values so a lost one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "out", TextTokenizer.load(path))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["architectures"] == [hf_cls]
    assert config["max_position_embeddings"] == P + 2 and config["type_vocab_size"] == 1
    back, info = getattr(transformers, hf_cls).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        want = back.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        if cls is BERT:
            got = model(ids, mask, output_hidden_states=True)
            for g, w in zip(got.hidden_states, want.hidden_states):
                close(g, w)
            close(got.pooled, want.pooler_output)
        else:
            close(model(ids, mask)[0], want.logits)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs(TEXTS[0], TEXTS[1]).input_ids == saved["tokenizer"](TEXTS[0], TEXTS[1]).input_ids
    assert "token_type_ids" not in theirs(TEXTS[0])


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
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key' \(relative position"),
        ({"is_decoder": True}, "sets is_decoder=True"),
        ({"hidden_act": "gelu_new"}, "sets hidden_act='gelu_new', an activation tinygraft does not implement here"),
        ({"max_position_embeddings": 2}, "leaves no position past pad_token_id=1"),
    ],
)
def test_settings_we_lack_are_refused_by_name(saved, tmp_path, change, match):
    with pytest.raises(TinygraftError, match=match):
        BERT.from_pretrained(edited(saved["model"][1], tmp_path, **change))


def test_a_config_that_cannot_be_written_as_roberta_is_refused():
    with pytest.raises(TinygraftError, match="numbers positions from pad_token_id \\+ 1: it needs position_offset=2"):
        BERTConfig(vocab_size=50, pad_token_id=1, n_embd=64, n_head=4, hf_model_type="roberta")


# ----------------------------------------------------------------------------------------------- a run
def test_finetune_from_roberta_exports_roberta(saved, tmp_path, capsys):
    data = make_data(tmp_path)
    run = tmp_path / "run"
    args = ["finetune", "--from", saved["mlm"][1], "--out", run, "--train", data["train"], "--val", data["val"],
            "--steps", 2, "--batch-size", 8, "--max-length", 24, "--eval-every", 2]  # fmt: skip
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    assert main(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert "as RobertaModel" in capsys.readouterr().out
    back, info = transformers.RobertaModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}  # a masked LM has none
    ours = runs.load(run).model.backbone
    ids, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        close(ours(ids, mask).last_hidden_state, back.eval()(input_ids=ids, attention_mask=mask).last_hidden_state)
