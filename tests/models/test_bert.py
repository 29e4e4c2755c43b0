import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, BERTConfig, BERTForMaskedLM


def config(**kw) -> BERTConfig:
    cfg = dict(vocab_size=53, max_position_embeddings=40, n_layer=2, n_head=2, n_embd=32, intermediate_size=48)
    cfg.update(kw)
    return BERTConfig(**cfg)


def test_padding_invariance():
    """Padded and unpadded inputs give the same outputs on the real tokens."""
    model = BERT(config()).eval()
    lengths = [5, 11, 1]
    seqs = [torch.randint(1, 53, (n,)) for n in lengths]
    T = max(lengths) + 3
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    types = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
        types[i, len(s) // 2 : len(s)] = 1
    batched = model(ids, mask, types)
    for i, s in enumerate(seqs):
        alone = model(s[None], None, types[i : i + 1, : len(s)])
        n = len(s)
        torch.testing.assert_close(batched.last_hidden_state[i, :n], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.pooled[i], alone.pooled[0], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_bidirectionality():
    model = BERT(config()).eval()
    ids = torch.randint(1, 53, (2, 9))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1] is out.last_hidden_state
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 53
    # An encoder sees the whole sequence: changing the last token moves the first position's state.
    assert not torch.allclose(model(changed).last_hidden_state[:, 0], out.last_hidden_state[:, 0])


def test_mlm_head_tied_and_loss_on_chosen_tokens():
    model = BERTForMaskedLM(config()).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.bert.pooler is None
    ids = torch.randint(1, 53, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 3] = 7
    labels[1, 5] = 11
    logits, loss = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(logits[labels != -100].double(), labels[labels != -100])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_padding_embedding_row_starts_at_zero():
    model = BERT(config())
    assert model.embeddings.word_embeddings.weight[0].abs().max() == 0


def test_config_errors_name_the_setting():
    with pytest.raises(TinygraftError, match="hidden_act 'swish'"):
        config(hidden_act="swish")
    with pytest.raises(TinygraftError, match="head dim"):
        config(n_embd=40, n_head=2)
    model = BERT(config()).eval()
    with pytest.raises(TinygraftError, match="longer than the model's 40 positions"):
        model(torch.ones(1, 41, dtype=torch.long))
