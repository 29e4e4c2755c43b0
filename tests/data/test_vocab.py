"""Vocabulary extension on GPT, BERT-MLM and the real MiniLM: old outputs unchanged, new tokens one id, reload."""

import pytest
import torch

from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.data.vocab import extend_vocab
from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.models.pretrained import load_pretrained, load_tokenizer

TEXT = [
    "Gradient descent moves the weights against the gradient of the loss.",
    "Attention lets every position read every other position in the sequence.",
    "A tokenizer splits text into pieces; an embedding turns each piece into a vector.",
    "Fine-tuning adapts a pretrained model to a downstream task with few labels.",
] * 10
NEW = ["tinygraft", "safetensors", "tinygraft"]  # repeated on purpose


def check_extension(model, tok, forward, head_weight, head_bias=None):
    old_rows = model.config.vocab_size
    probe = torch.tensor([tok.encode(TEXT[1])[:12]])
    before = forward(probe)
    emb_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pieces = {t: tok.encode(t) for t in NEW}
    added = extend_vocab(model, tok, NEW)
    assert list(added) == ["tinygraft", "safetensors"]
    assert sorted(added.values()) == [old_rows, old_rows + 1] and model.config.vocab_size == old_rows + 2
    for t, i in added.items():
        assert tok.encode(t) == [i] and tok.encode(f"say {t}, then {t}.").count(i) == 2
    emb = next(m for n, m in model.named_modules() if n.endswith(("wte", "word_embeddings")))
    old_emb = next(v for k, v in emb_before.items() if k.endswith(("wte.weight", "word_embeddings.weight")))
    assert torch.equal(emb.weight[:old_rows], old_emb)
    for t, i in added.items():
        torch.testing.assert_close(emb.weight[i], old_emb[pieces[t]].mean(0))
    assert head_weight() is emb.weight  # still tied
    if head_bias is not None:
        bias = head_bias()
        assert bias.shape == (old_rows + 2,)
        old_bias = emb_before["cls.predictions.bias"]
        torch.testing.assert_close(bias[added["tinygraft"]], old_bias[pieces["tinygraft"]].mean())
    after = forward(probe)
    torch.testing.assert_close(after[..., :old_rows], before, rtol=0, atol=0)  # old-token outputs unchanged
    assert after.shape[-1] == old_rows + 2
    return added


def test_gpt_extension_save_and_reload(tmp_path):
    tok = TextTokenizer.train(TEXT, "bpe", vocab_size=320)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    added = check_extension(model, tok, lambda x: model(x)[0].detach(), lambda: model.lm_head.weight)
    ids = torch.tensor([tok.encode("tinygraft loads safetensors")])
    assert set(added.values()) <= set(ids[0].tolist())
    _, loss = model(ids, ids)  # the new rows train like the old ones
    loss.backward()
    assert model.transformer.wte.weight.grad[added["tinygraft"]].abs().sum() > 0
    model.save_pretrained(tmp_path, tokenizer=tok)
    again = GPT.from_pretrained(tmp_path)
    tok2 = load_tokenizer(tmp_path)
    assert again.config.vocab_size == tok2.vocab_size == model.config.vocab_size
    assert tok2.encode("tinygraft loads safetensors") == ids[0].tolist()
    torch.testing.assert_close(again(ids)[0], model(ids)[0])


def test_bert_mlm_extension_keeps_decoder_and_bias_tied(tmp_path):
    tok = TextTokenizer.train(TEXT, "wordpiece", vocab_size=200)
    cfg = BERTConfig(
        vocab_size=tok.vocab_size, max_position_embeddings=32, n_layer=1, n_head=2, n_embd=32, intermediate_size=48
    )
    model = BERTForMaskedLM(cfg).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    preds = model.cls.predictions
    check_extension(model, tok, lambda x: model(x)[0].detach(), lambda: preds.decoder.weight, lambda: preds.bias)
    assert model.bert.config.vocab_size == model.config.vocab_size
    model.save_pretrained(tmp_path, tokenizer=tok)
    again = BERTForMaskedLM.from_pretrained(tmp_path)
    ids = torch.tensor([tok.encode_for_model("tinygraft and safetensors")[0]])
    torch.testing.assert_close(again(ids)[0], model(ids)[0])
    assert load_tokenizer(tmp_path).encode("tinygraft") == [tok.token_to_id("tinygraft")]


def test_minilm_extension_reloads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
    try:
        pre = load_pretrained("minilm")
    except TinygraftError as e:
        pytest.skip(str(e))
    model, tok = pre.model, pre.tokenizer
    sentence = "A man is playing a guitar."
    ids = torch.tensor([tok.encode_for_model(sentence)[0]])
    before = model(ids).last_hidden_state
    added = extend_vocab(model, tok, ["COVID19", "MiniLM"])
    assert [tok.encode(t) for t in ("covid19", "MiniLM")] == [[added["COVID19"]], [added["MiniLM"]]]
    torch.testing.assert_close(model(ids).last_hidden_state, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert isinstance(BERT.from_pretrained(tmp_path), BERT)
    ref = transformers.BertModel.from_pretrained(tmp_path).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "covid19 spread; MiniLM embeds it"
    enc = ref_tok(text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == tok.encode_for_model(text)[0]
    with torch.no_grad():
        want = ref(**enc).last_hidden_state
    got = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_input():
    tok = TextTokenizer.train(TEXT, "bpe", vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(TinygraftError, match="is empty"):
        extend_vocab(model, tok, ["ok", "  "])
    with pytest.raises(TinygraftError, match="list of strings"):
        extend_vocab(model, tok, "tinygraft")
    assert extend_vocab(model, tok, [tok.id_to_token(5)]) == {}  # already one vocabulary entry: nothing to add
    small = GPT(GPTConfig(vocab_size=tok.vocab_size - 1, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(TinygraftError, match="do not belong together"):
        extend_vocab(small, tok, ["tinygraft"])
