"""analysis/layers.py: every layer from one pass, the last one what `embed` pools, pads masked out of every layer."""

import pytest
import torch

from tinygraft.analysis.layers import layer_features
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.pooling import Pooling, sentence_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU (tests/conftest.py)
TEXTS = [f"text {i}: " + "a few words that repeat " * (1 + i % 5) for i in range(11)]  # lengths that differ


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    bert_tok, gpt_tok = TextTokenizer.train(TEXTS, "wordpiece", 200), TextTokenizer.train(TEXTS, "bpe", 300)
    bert = BERT(BERTConfig(vocab_size=bert_tok.vocab_size, max_position_embeddings=64, n_layer=3, n_head=2, n_embd=32))
    gpt = GPT(GPTConfig(vocab_size=gpt_tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    return {"bert": (bert.eval(), bert_tok), "gpt": (gpt.eval(), gpt_tok)}


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_every_layer_in_one_pass_pads_masked_and_batches_joined(family, models):
    """Batched 4 at a time (texts padded to the longest of their batch) equals one text at a time (no pads)."""
    model, tok = models[family]
    pooling = Pooling(modes=["mean", "max"])
    batched = [torch.cat(parts) for parts in zip(*layer_features(model, tok, TEXTS, pooling, batch_size=4))]
    alone = [torch.cat(parts) for parts in zip(*layer_features(model, tok, TEXTS, pooling, batch_size=1))]
    assert len(batched) == model.config.n_layer + 1
    assert all(x.shape == (len(TEXTS), 2 * 32) and x.dtype == torch.float32 for x in batched)
    for b, a in zip(batched, alone):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # float32 sums over different paddings
    tokens = [torch.cat(p) for p in zip(*layer_features(model, tok, TEXTS, tokens=True, batch_size=4))]
    n_real = sum(len(tok.encode_for_model(t)[0]) for t in TEXTS)
    assert all(x.shape == (n_real, 32) for x in tokens)
    assert not torch.equal(tokens[0], tokens[-1])  # the layers are different states, not one read twice


def test_the_last_bert_layer_pools_to_the_sentence_embedding(models):
    model, tok = models["bert"]
    last = torch.cat([layers[-1] for layers in layer_features(model, tok, TEXTS, dtype=torch.float64)])
    assert last.dtype == torch.float64
    want = sentence_embeddings(model, tok, TEXTS, Pooling(), normalize=False)
    torch.testing.assert_close(last.float(), want, rtol=0, atol=1e-6)
