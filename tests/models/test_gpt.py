import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.models import GPT, GPTConfig, build_model, get_preset


def tiny(**kw) -> GPT:
    cfg = dict(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_causality():
    """Changing token t never changes the logits before t."""
    model = tiny()
    x = torch.randint(0, 61, (2, 17))
    base = model(x)[0]
    for t in (0, 5, 16):
        y = x.clone()
        y[:, t] = (y[:, t] + 7) % 61
        out = model(y)[0]
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("prefix", [1, 7, 20])
def test_kv_cache_equals_full_forward(prefix):
    model = tiny()
    x = torch.randint(0, 61, (3, 24))
    full = model(x)[0]
    cache = model.new_kv_cache(3)
    pieces = [model(x[:, :prefix], kv_cache=cache)[0]]
    for t in range(prefix, 24):
        pieces.append(model(x[:, t : t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 24


def test_generate_cached_equals_uncached_greedy():
    model = tiny()
    x = torch.randint(0, 61, (2, 5))
    a = model.generate(x, 40, temperature=0, use_cache=True)  # runs past block_size: exercises the window reset
    b = model.generate(x, 40, temperature=0, use_cache=False)
    assert a.shape == (2, 45)
    assert torch.equal(a[:, :32], b[:, :32])  # identical while the context fits the positions


def test_generate_top_k_top_p_only_draw_allowed_tokens():
    model = tiny()
    x = torch.randint(0, 61, (4, 3))
    g = torch.Generator().manual_seed(1)
    out = model.generate(x, 1, temperature=1.0, top_k=1, generator=g)
    greedy = model.generate(x, 1, temperature=0)
    assert torch.equal(out, greedy)
    out = model.generate(x, 1, temperature=1.0, top_p=1e-6, generator=g)
    assert torch.equal(out, greedy)


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    model = tiny()
    x = torch.randint(0, 61, (2, 9))
    y = torch.randint(0, 61, (2, 9))
    y[0, :4] = -100
    logits, loss = model(x, y)
    keep = y != -100
    ref = torch.nn.functional.cross_entropy(logits[keep].double(), y[keep]).float()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_tied_head_and_init():
    model = GPT(get_preset("gpt-tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight
    assert abs(proj.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.002
    assert model.transformer.h[0].mlp.c_fc.bias.abs().max() == 0


def test_gpt2_preset_size():
    with torch.device("meta"):
        model = build_model(get_preset("gpt2"))
    assert model.num_params() == 124_439_808  # GPT-2 small, tied head counted once


def test_sequence_longer_than_positions_is_an_error():
    model = tiny()
    with pytest.raises(TinygraftError, match="longer than the model's 32 positions"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_bad_head_dim_is_an_error():
    with pytest.raises(TinygraftError, match="head dim"):
        GPTConfig(n_embd=96, n_head=2)
