"""Prompt and prefix tuning on our GPT and BERT: against the base model reading real tokens (an independent
reference), KV-cache decoding, padding, save/reload, mixed batches, and peft's layouts on transformers' models."""

import copy

import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.peft.adapters import adapter_parameters, adapters_disabled, merge_adapter, mixed_batch, set_adapter
from tinygraft.peft.files import load_adapter, save_adapter
from tinygraft.peft.prompt import add_prefix_tuning, add_prompt_tuning, virtual_layers

from .test_lora import tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft", reason="peft is the reference prompt/prefix implementation (pip install .[dev])")
V = 99


def our_gpt(block=32):
    return GPT(GPTConfig(vocab_size=V, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def our_bert(positions=32):
    cfg = BERTConfig(vocab_size=V, max_position_embeddings=positions, n_layer=2, n_head=2, n_embd=32,
                     intermediate_size=37, dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return BERTForMaskedLM(cfg).eval()


def run(model, ids, mask=None):
    with torch.no_grad():
        return model(ids)[0] if isinstance(model, GPT) else model(ids, attention_mask=mask)[0]


def batch(rows=3, T=9):
    ids = torch.randint(1, V, (rows, T))
    mask = torch.ones(rows, T, dtype=torch.bool)
    mask[1, 5:] = False  # padding
    return ids, mask


def layer_of(model):
    return next(virtual_layers(model))[1]


@pytest.mark.parametrize("build", [our_gpt, our_bert])
def test_a_prompt_of_real_token_embeddings_equals_reading_those_tokens(build):
    torch.manual_seed(0)
    model = build()
    ids, mask = batch()
    before = run(model, ids, mask)
    prompt = torch.randint(1, V, (4,))
    n = add_prompt_tuning(model, 4, "text:x", init_ids=prompt)
    assert n == 4 * 32 and [p.shape for p in adapter_parameters(model)] == [(4, 32)]
    with adapters_disabled(model):
        assert torch.equal(run(model, ids, mask), before)  # disabling restores the base exactly
        longer = torch.cat([prompt.expand(3, 4), ids], 1)
        expected = run(model, longer, torch.cat([torch.ones(3, 4, dtype=torch.bool), mask], 1))[:, 4:]
    got = run(model, ids, mask)
    assert got.shape == before.shape  # the head sees only the real positions
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _base_kv(model, tokens):
    """Each GPT block's keys and values of `tokens` read by the base (causal: they do not depend on later tokens)."""
    found = []
    hooks = [blk.attn.c_attn.register_forward_hook(lambda m, i, o: found.append(o)) for blk in model.transformer.h]
    with adapters_disabled(model), torch.no_grad():
        model(tokens[None])
    for h in hooks:
        h.remove()
    C, H = model.config.n_embd, model.config.n_head
    return [out[0].view(len(tokens), 3, H, C // H)[:, 1:] for out in found]  # per layer (N, 2, H, D)


def test_a_gpt_prefix_of_real_keys_equals_reading_those_tokens():
    torch.manual_seed(1)
    model = our_gpt()
    ids, _ = batch()
    prefix = torch.randint(1, V, (5,))
    add_prefix_tuning(model, 5, positions="after")
    table = torch.stack(_base_kv(model, prefix), 1)  # (N, L, 2, H, D): peft's layout
    with torch.no_grad():
        layer_of(model).prompt_embeddings["default"].copy_(table.reshape(5, -1))
    with adapters_disabled(model):
        expected = run(model, torch.cat([prefix.expand(3, 5), ids], 1))[:, 5:]
    torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-after"])
def test_kv_cache_decoding_equals_the_full_forward(kind):
    torch.manual_seed(2)
    model = our_gpt(block=24)
    if kind == "prompt":
        add_prompt_tuning(model, 4)
    else:
        add_prefix_tuning(model, 4, projection=True, hidden=8, positions="after" if kind == "prefix-after" else "none")
    ids, _ = batch(T=12)
    full = run(model, ids)
    cache = model.new_kv_cache(3)
    with torch.no_grad():
        parts = [model(ids[:, :5], kv_cache=cache)[0]] + [
            model(ids[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:, :3], 30, temperature=0)  # past the window: re-reads with the prompt again
    assert out.shape == (3, 33)


def test_prefix_with_no_positions_keeps_the_models_full_length():
    model = our_gpt(block=16)
    add_prefix_tuning(model, 6)
    assert run(model, torch.randint(1, V, (1, 16))).shape == (1, 16, V)
    add_prompt_tuning(model, 6, adapter_name="p")
    with pytest.raises(TinygraftError, match="sequence of 16 tokens and the adapter's 6 virtual tokens is longer than"):
        run(model, torch.randint(1, V, (1, 16)))
    bert = our_bert(positions=12)
    add_prompt_tuning(bert, 4)
    with pytest.raises(TinygraftError, match="sequence of 9 tokens and the adapter's 4 virtual tokens is longer than"):
        run(bert, *batch())


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_bert_padding_is_masked_past_the_virtual_tokens(kind):
    torch.manual_seed(3)
    model = our_bert()
    (add_prompt_tuning if kind == "prompt" else add_prefix_tuning)(model, 3)
    ids, mask = batch()
    padded = run(model, ids, mask)[1, :5]
    alone = run(model, ids[1:2, :5], mask[1:2, :5])[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [our_gpt, our_bert])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_only_the_adapter_trains_and_a_save_reloads_it(build, kind, tmp_path):
    torch.manual_seed(4)
    model = build()
    pristine = copy.deepcopy(model)
    model.train()
    (add_prompt_tuning if kind == "prompt" else add_prefix_tuning)(model, 3)
    base = {k: v.clone() for k, v in model.state_dict().items() if "prompt_embeddings" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch()
    for _ in range(2):
        out = model(ids)[0] if isinstance(model, GPT) else model(ids, attention_mask=mask)[0]
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = {k: v for k, v in model.state_dict().items() if "prompt_embeddings" not in k}
    assert all(torch.equal(base[k], after[k]) for k in base)  # every base tensor bit-identical
    save_adapter(model, tmp_path)
    fresh = pristine
    load_adapter(fresh, tmp_path)
    assert torch.equal(run(fresh, ids, mask), run(model, ids, mask))


def test_a_reparametrised_prefix_is_saved_folded(tmp_path):
    torch.manual_seed(5)
    model = our_bert()
    add_prefix_tuning(model, 3, projection=True, hidden=8, positions="after")
    ids, mask = batch()
    layer = layer_of(model)
    assert set(layer.adapter_tensors("default")) > {"prompt_embeddings"}  # the MLP trains
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(model)
    fresh.bert.embeddings.word_embeddings = layer.base  # the base alone again
    load_adapter(fresh, tmp_path)
    assert not layer_of(fresh).prefix_mlp  # a plain table
    torch.testing.assert_close(run(fresh, ids, mask), run(model, ids, mask))


@pytest.mark.parametrize("build", [our_gpt, our_bert])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_mixed_batch_equals_each_row_alone(build, kind):
    torch.manual_seed(6)
    model = build()
    add = add_prompt_tuning if kind == "prompt" else add_prefix_tuning
    for name in ("a", "b", "c"):
        add(model, 3, adapter_name=name)
    for p in layer_of(model).prompt_embeddings.values():
        p.requires_grad_(True)  # each add trains only its own adapter
    names = ["b", "a", "c", "b"]
    ids, mask = batch(rows=4)

    def forward(i, j):
        return model(ids[i:j])[0] if isinstance(model, GPT) else model(ids[i:j], attention_mask=mask[i:j])[0]

    with mixed_batch(model, names):
        out = forward(0, 4)
        out.square().sum().backward()
    grads = {n: layer_of(model).prompt_embeddings[n].grad.clone() for n in "abc"}
    model.zero_grad()
    for i, name in enumerate(names):
        set_adapter(model, name)
        row = (
            model(ids[i : i + 1])[0]
            if isinstance(model, GPT)
            else model(ids[i : i + 1], attention_mask=mask[i : i + 1])[0]
        )
        torch.testing.assert_close(out[i : i + 1].detach(), row.detach(), rtol=1e-5, atol=1e-5)
        row.square().sum().backward()
    for n in "abc":
        torch.testing.assert_close(grads[n], layer_of(model).prompt_embeddings[n].grad, rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_sentence():
    model = our_gpt()
    add_prompt_tuning(model, 3, adapter_name="p")
    add_prefix_tuning(model, 3, adapter_name="q")
    ids, _ = batch()
    with pytest.raises(TinygraftError, match="same kind with the same --num-virtual-tokens"):
        with mixed_batch(model, ["p", "q", "p"]):
            run(model, ids)
    with pytest.raises(TinygraftError, match="no adapter named 'zz'"):
        with mixed_batch(model, ["zz", "p", "p"]):
            pass
    with pytest.raises(TinygraftError, match="do not merge"):
        merge_adapter(model, "p")
    with pytest.raises(TinygraftError, match="positive integer"):
        add_prompt_tuning(our_gpt(), 0)
    with pytest.raises(TinygraftError, match="GPT and BERT"):
        add_prompt_tuning(torch.nn.Sequential(torch.nn.Linear(3, 3)), 2)


# ------------------------------------------------------------------------------------------------------- peft
def _pair(build, tmp_path):
    hf = build()
    hf.save_pretrained(tmp_path / "base")
    ours = (GPT if isinstance(hf, type(tiny_gpt2())) else BERT).from_pretrained(tmp_path / "base")
    return hf, ours


def _outputs(hf_model, ours, ids, mask):
    with torch.no_grad():
        if isinstance(ours, GPT):
            theirs, mine = hf_model(input_ids=ids).logits, ours(ids)[0]
        else:
            theirs = hf_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            mine = ours(ids, attention_mask=mask).last_hidden_state
    return theirs[:, -mine.shape[1] :], mine  # peft returns a prompt's positions too


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_adapter_saved_here_loads_in_peft(build, kind, tmp_path):
    torch.manual_seed(7)
    hf, ours = _pair(build, tmp_path)
    if kind == "prompt":
        add_prompt_tuning(ours, 3, "random")
    else:
        add_prefix_tuning(ours, 3, projection=True, hidden=8, positions="after")
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    ids, mask = batch(T=7)
    t, m = _outputs(theirs, ours, ids, mask)
    torch.testing.assert_close(t, m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_adapter_loads_here(build, kind, tmp_path):
    torch.manual_seed(8)
    hf, ours = _pair(build, tmp_path)
    task = "CAUSAL_LM" if isinstance(ours, GPT) else "FEATURE_EXTRACTION"
    if kind == "prompt":
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    else:
        config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4)
    theirs = peft.get_peft_model(copy.deepcopy(hf), config)
    theirs.save_pretrained(tmp_path / "adapter")
    assert load_adapter(ours, tmp_path / "adapter") == theirs.get_nb_trainable_parameters()[0]
    ids, mask = batch(T=7)
    t, m = _outputs(theirs.eval(), ours, ids, mask)
    torch.testing.assert_close(t, m, rtol=1e-5, atol=1e-5)
    wider = type(ours)(type(ours.config)(**{**ours.config.__dict__, "n_embd": 64}))
    with pytest.raises(TinygraftError, match="saved for a base with token_dim=32; this model has 64"):
        load_adapter(wider, tmp_path / "adapter")
