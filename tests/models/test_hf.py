"""The Hugging Face layout in and out, against `transformers` itself on small random models."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, GPT, BERTForMaskedLM, hf
from tinygraft.models.pretrained import describe_checkpoint, format_description, load_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
V, P = 99, 24  # awkward vocabulary, positions


def gpt2_config(**kw):
    cfg = dict(vocab_size=V, n_positions=P, n_embd=32, n_layer=2, n_head=2, bos_token_id=V - 1, eos_token_id=V - 1)
    return transformers.GPT2Config(**{**cfg, **kw})


def bert_config(**kw):
    cfg = dict(
        vocab_size=V,
        max_position_embeddings=P,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    return transformers.BertConfig(**{**cfg, **kw})


def hf_model(cls, config):
    torch.manual_seed(1)
    model = cls(config).eval()
    with torch.no_grad():  # fresh LayerNorms are identity and biases zero: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def padded_batch(lengths=(7, 1, 5), T=9, types=True):
    ids = torch.randint(1, V, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    tt = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        if types:
            tt[i, n // 2 : n] = 1
    return ids, mask, tt


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Directories written by transformers: GPT2LMHeadModel, GPT2Model, BertModel, BertForMaskedLM."""
    out = {}
    for name, cls, cfg in [
        ("gpt2", transformers.GPT2LMHeadModel, gpt2_config()),
        ("gpt2-base", transformers.GPT2Model, gpt2_config()),
        ("bert", transformers.BertModel, bert_config()),
        ("bert-mlm", transformers.BertForMaskedLM, bert_config()),
    ]:
        model = hf_model(cls, cfg)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


# ------------------------------------------------------------------------------------------------------ in
@pytest.mark.parametrize("name", ["gpt2", "gpt2-base"])
def test_gpt2_loads_and_matches(saved, name):
    ref, path = saved[name]
    model = GPT.from_pretrained(path)
    ids, mask, _ = padded_batch()
    logits, _ = model(ids)
    with torch.no_grad():
        if name == "gpt2":
            want = ref(input_ids=ids, attention_mask=mask).logits
            got = logits
        else:
            want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
            got = model.hidden_states(ids)
    real = mask.bool()  # causal + right padding: the real positions never see a pad
    close(got[real], want[real])
    with torch.no_grad():  # and unpadded, no mask
        alone = ref(input_ids=ids[:1, :7])
        want = alone.logits if name == "gpt2" else alone.last_hidden_state
    close(model(ids[:1, :7])[0] if name == "gpt2" else model.hidden_states(ids[:1, :7]), want)
    assert model.load_report.family == "gpt" and model.load_report.missing_heads == []


def test_bert_loads_and_matches_every_layer(saved):
    ref, path = saved["bert"]
    model = BERT.from_pretrained(path)
    ids, mask, types = padded_batch()
    out = model(ids, mask, types, output_hidden_states=True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    real = mask.bool()
    assert len(out.hidden_states) == len(want.hidden_states) == 3
    for got, exp in zip(out.hidden_states, want.hidden_states):
        close(got[real], exp[real])
    close(out.pooled, want.pooler_output)
    plain = model(ids[:1, :7])
    close(plain.last_hidden_state, ref(input_ids=ids[:1, :7]).last_hidden_state.detach())


def test_bert_mlm_loads_and_matches(saved):
    ref, path = saved["bert-mlm"]
    model = BERTForMaskedLM.from_pretrained(path)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids, mask, types = padded_batch()
    logits, _ = model(ids, mask, types)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    close(logits[mask.bool()], want[mask.bool()])


def test_mlm_file_as_plain_bert_strips_prefix_and_reports(saved):
    ref, path = saved["bert-mlm"]
    model = BERT.from_pretrained(path)
    assert model.pooler is None and model.load_report.missing_heads == ["pooler"]
    assert any(n.startswith("cls.predictions.") for n in model.load_report.unused_tensors)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        want = ref.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    close(model(ids, mask, types).last_hidden_state[mask.bool()], want[mask.bool()])
    fresh = BERT.from_pretrained(path, new_head=True)
    assert fresh.pooler is not None and fresh.load_report.new_heads == ["pooler"]


def test_missing_mlm_head_is_an_error_unless_asked_for(saved):
    _, path = saved["bert"]
    with pytest.raises(TinygraftError, match="no masked-LM head"):
        BERTForMaskedLM.from_pretrained(path)
    model = BERTForMaskedLM.from_pretrained(path, new_head=True)
    assert model.load_report.new_heads == ["masked-LM head"]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.transform.LayerNorm.weight.eq(1).all()  # freshly initialised


def test_old_buffers_tied_copies_and_tf_names_are_accepted(saved, tmp_path):
    """Old GPT-2 files carry attn.bias / attn.masked_bias buffers and lm_head.weight; TF ports say gamma/beta."""
    ref, path = saved["gpt2"]
    tensors = load_file(path / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, P, P)
    tensors["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    (tmp_path / "g").mkdir()
    save_file(tensors, tmp_path / "g" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "g" / "config.json").write_text((path / "config.json").read_text())
    model = GPT.from_pretrained(tmp_path / "g")
    assert {"transformer.h.0.attn.bias", "lm_head.weight"} <= set(model.load_report.unused_tensors)
    ids = torch.randint(0, V, (2, 5))
    close(model(ids)[0], ref(input_ids=ids).logits.detach())

    bref, bpath = saved["bert"]
    tensors = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in load_file(bpath / "model.safetensors").items()
    }
    tensors["embeddings.position_ids"] = torch.arange(P)[None]
    tensors["cls.seq_relationship.weight"] = torch.randn(2, 32)
    (tmp_path / "b").mkdir()
    save_file(tensors, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "b" / "config.json").write_text((bpath / "config.json").read_text())
    model = BERT.from_pretrained(tmp_path / "b")
    assert {"embeddings.position_ids", "cls.seq_relationship.weight"} <= set(model.load_report.unused_tensors)
    close(model(ids).last_hidden_state, bref(input_ids=ids).last_hidden_state.detach())


# ------------------------------------------------------------------------------------------------------ out
def train_a_few_steps(model, batch_fn, steps=3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = batch_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_gpt_trained_here_loads_in_transformers(saved, tmp_path):
    _, path = saved["gpt2"]
    model = GPT.from_pretrained(path)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    ids = torch.randint(0, V, (4, 12))
    train_a_few_steps(model, lambda m: m(ids[:, :-1], ids[:, 1:].contiguous())[1])
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
    model.save_pretrained(tmp_path / "out")
    back, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()
    x, mask, _ = padded_batch()
    with torch.no_grad():
        close(model(x)[0][mask.bool()], back.eval()(input_ids=x, attention_mask=mask).logits[mask.bool()])
    again = GPT.from_pretrained(tmp_path / "out")  # and round trip here
    close(again(x)[0], model(x)[0])


@pytest.mark.parametrize("cls,hf_cls", [(BERT, "BertModel"), (BERTForMaskedLM, "BertForMaskedLM")])
def test_bert_trained_here_loads_in_transformers(saved, tmp_path, cls, hf_cls):
    _, path = saved["bert" if cls is BERT else "bert-mlm"]
    model = cls.from_pretrained(path)
    ids, mask, types = padded_batch()
    if cls is BERT:
        train_a_few_steps(model, lambda m: m(ids, mask, types).pooled.pow(2).mean())
    else:
        labels = torch.where(mask.bool(), ids, -100)
        train_a_few_steps(model, lambda m: m(ids, mask, types, labels)[1])
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [hf_cls] and config["model_type"] == "bert"
    back, info = getattr(transformers, hf_cls).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back.eval()
    real = mask.bool()
    with torch.no_grad():
        want = back(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if cls is BERT:
            got = model(ids, mask, types)
            close(got.last_hidden_state[real], want.last_hidden_state[real])
            close(got.pooled, want.pooler_output)
        else:
            close(model(ids, mask, types)[0][real], want.logits[real])


def test_save_into_existing_directory_keeps_other_files(saved, tmp_path):
    _, path = saved["gpt2"]
    model = GPT.from_pretrained(path)
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".tmp-{tmp_path.name}")]
    close(GPT.from_pretrained(tmp_path).transformer.wte.weight, model.transformer.wte.weight)


# --------------------------------------------------------------------------------------------- config rules
def edited(path, tmp_path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    out = tmp_path / "edited"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    if not (out / "model.safetensors").exists():
        (out / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    return out


@pytest.mark.parametrize(
    "which,change,match",
    [
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ("bert", {"is_decoder": True}, "is_decoder=True"),
        ("bert", {"add_cross_attention": True}, "add_cross_attention=True"),
        ("bert", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("bert", {"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ("gpt2", {"activation_function": "gelu"}, "activation_function='gelu'"),
        ("gpt2", {"n_inner": 40}, "n_inner=40"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("bert", {"model_type": "llama"}, "'llama' model"),
    ],
)
def test_architecture_settings_we_lack_are_errors_naming_them(saved, tmp_path, which, change, match):
    path = edited(saved[which][1], tmp_path, **change)
    loader = GPT if which == "gpt2" else BERT
    with pytest.raises(TinygraftError, match=match):
        loader.from_pretrained(path)


def test_bookkeeping_keys_are_accepted_and_reported(saved, tmp_path):
    path = edited(
        saved["bert"][1],
        tmp_path,
        _name_or_path="someone/model",
        gradient_checkpointing=True,
        torch_dtype="float16",
        classifier_dropout=0.2,
    )
    report = BERT.from_pretrained(path).load_report
    for key in (
        "_name_or_path",
        "transformers_version",
        "gradient_checkpointing",
        "torch_dtype",
        "use_cache",
        "classifier_dropout",
    ):
        assert key in report.unused_config
    assert "hidden_size" not in report.unused_config


def test_wrong_family_is_an_error(saved):
    with pytest.raises(TinygraftError, match="not a BERT model"):
        BERT.from_pretrained(saved["gpt2"][1])
    with pytest.raises(TinygraftError, match="not a GPT-2 model"):
        GPT.from_pretrained(saved["bert"][1])


# ----------------------------------------------------------------------------------------------- bad input
def test_directory_without_weights(tmp_path, saved):
    (tmp_path / "config.json").write_text((saved["bert"][1] / "config.json").read_text())
    with pytest.raises(TinygraftError, match="holds no model weights"):
        BERT.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(TinygraftError, match="pytorch_model.bin, which tinygraft does not read"):
        BERT.from_pretrained(tmp_path)
    with pytest.raises(TinygraftError, match="holds no config.json"):
        BERT.from_pretrained(tmp_path / "..")
    with pytest.raises(TinygraftError, match="does not exist"):
        BERT.from_pretrained(tmp_path / "nope")


def test_truncated_weights(saved, tmp_path):
    path = edited(saved["bert"][1], tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TinygraftError, match="is truncated or corrupt"):
        BERT.from_pretrained(path)


def test_shape_mismatch(saved, tmp_path):
    path = edited(saved["bert"][1], tmp_path, vocab_size=V + 1)
    with pytest.raises(TinygraftError, match=r"has shape \[99, 32\] but its config.json implies \[100, 32\]"):
        BERT.from_pretrained(path)
    path = edited(saved["bert"][1], tmp_path, vocab_size=V, num_hidden_layers=1)
    with pytest.raises(TinygraftError, match="config and the weights disagree"):
        BERT.from_pretrained(path)
    path = edited(saved["bert"][1], tmp_path, num_hidden_layers=3)
    with pytest.raises(TinygraftError, match="lacks the tensor for 'encoder.layer.2"):
        BERT.from_pretrained(path)


def test_tokenizer_that_does_not_belong(saved, tmp_path):
    path = edited(saved["bert"][1], tmp_path)
    big = TextTokenizer.train(["a few words of text, enough for a tokenizer"] * 20, "bpe", vocab_size=300)
    big.save(path)
    with pytest.raises(TinygraftError, match="has 2\\d\\d tokens but the model's embedding has only 99 rows"):
        load_tokenizer(path)
    with pytest.raises(TinygraftError, match="does not belong"):
        BERT.from_pretrained(path).save_pretrained(tmp_path / "out", tokenizer=big)


def test_describe_checkpoint(saved):
    info = describe_checkpoint(saved["bert-mlm"][1])
    model = BERTForMaskedLM.from_pretrained(saved["bert-mlm"][1])
    assert info["family"] == "bert" and info["heads"] == {"pooler": False, "masked_lm": True}
    assert info["params"] == model.num_params()
    assert info["config"]["n_embd"] == 32 and "transformers_version" in info["unused_config"]
    assert hf.is_hf_dir(saved["gpt2"][1])
    gpt = describe_checkpoint(saved["gpt2"][1])
    assert gpt["params"] == GPT.from_pretrained(saved["gpt2"][1]).num_params()


def test_bf16_and_sharded_files(saved, tmp_path):
    """A bf16 file loads into an fp32 model (or stays bf16 when asked); shards named by an index load too."""
    ref, path = saved["bert"]
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    model = BERT.from_pretrained(tmp_path)
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    want = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}
    assert torch.equal(model.encoder.layer[1].output.dense.weight, want["encoder.layer.1.output.dense.weight"])
    assert BERT.from_pretrained(tmp_path, dtype=torch.bfloat16).pooler.dense.weight.dtype == torch.bfloat16
    assert describe_checkpoint(tmp_path)["dtype"] == "BF16"
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TinygraftError, match="lacks the weights shard 'model-00002-of-00002.safetensors'"):
        BERT.from_pretrained(tmp_path)


def test_format_description_lists_unused_entries(saved):
    text = format_description(describe_checkpoint(saved["bert-mlm"][1]))
    assert "BertForMaskedLM" in text and "masked_lm yes" in text and "transformers_version=" in text
