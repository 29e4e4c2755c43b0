"""Activation checkpointing (`--set train.activation_checkpointing=true`, core/layers.py: run_block) with every method:
the same loss and the same gradient of every trainable tensor as without it, dropout on (the recomputed forward draws
the forward's masks), prompt and prefix tuning included (peft#869, adapters#732: no gradient reached the prompt under
reentrant checkpointing), mixed batches, KV-cache decoding untouched, fewer bytes saved for backward, and both jobs
from the command line."""

import dataclasses
import json

import pytest
import torch

from tests.cli.tiny_runs import TINY, write_corpus
from tests.train.finetune_fixtures import make_bert_dir, make_data
from tinygraft.cli.main import main
from tinygraft.core import layers
from tinygraft.core.config import to_dict
from tinygraft.core.layers import set_activation_checkpointing
from tinygraft.models import GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.peft.adapters import adapter_layers, mixed_batch
from tinygraft.peft.api import add_adapter
from tinygraft.train.config import FinetuneTrain, TrainConfig, full_dict, resolve, resolve_finetune

pytestmark = pytest.mark.usefixtures("one_thread")

V = 99
METHODS = {
    "full": None,
    "lora": dict(r=2, alpha=4, dropout=0.2),
    "dora": dict(r=3, alpha=4, dropout=0.2),
    "ia3": {},
    "houlsby": dict(reduction=8),
    "pfeiffer": dict(reduction=4),
    "prompt-tuning": dict(num_virtual_tokens=3),
    "prefix-tuning": dict(num_virtual_tokens=3, projection=True, hidden=16),  # the MLP: more graph above the blocks
}


def our_gpt(dropout=0.1):
    return GPT(GPTConfig(vocab_size=V, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def our_bert(dropout=0.1):
    cfg = BERTConfig(vocab_size=V, max_position_embeddings=24, n_layer=2, n_head=2, n_embd=32, intermediate_size=37,
                     dropout=dropout, attention_dropout=dropout)  # fmt: skip
    return BERTForMaskedLM(cfg)


def build(make, method, names=("a",), dropout=0.1):
    """A float64 model in training mode with `method`'s adapters (moved off their identity start), or all of it
    trainable for "full"."""
    model = make(dropout).double().train()
    if METHODS[method] is None:
        return model
    for name in names:
        add_adapter(model, method, name=name, **METHODS[method])
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for n in layer.settings:
                for t in layer.adapter_tensors(n).values():
                    t.add_(torch.randn_like(t) * 0.2)
    model.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for n in layer.settings:
            for t in layer.adapter_tensors(n).values():
                t.requires_grad_(True)
    return model


def batch():
    ids = torch.randint(1, V, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row: BERT's mask reaches the checkpointed layers as a block input
    return ids, mask


def loss_of(model, ids, mask):
    if isinstance(model, GPT):
        return model(ids, ids)[1]
    labels = ids.masked_fill(mask == 0, -100)
    return model(ids, attention_mask=mask, labels=labels)[1]


def step(model, on: bool, ids, mask, seed=1234):
    """(loss, {name: grad}, block forwards run): one forward and backward from the RNG state `seed`."""
    set_activation_checkpointing(model, on)
    model.zero_grad(set_to_none=True)
    calls = []
    blocks = model.transformer.h if isinstance(model, GPT) else model.bert.encoder.layer
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
    torch.manual_seed(seed)
    loss = loss_of(model, ids, mask)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads, len(calls)


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def counted(monkeypatch):
    """How many block calls went through torch's checkpoint."""
    calls = []
    real = layers.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("make", [our_gpt, our_bert], ids=["gpt", "bert"])
@pytest.mark.parametrize("method", list(METHODS))
def test_loss_and_every_gradient_equal_with_and_without_checkpointing(make, method):
    model = build(make, method)
    ids, mask = batch()
    plain, checkpointed = step(model, False, ids, mask), step(model, True, ids, mask)
    assert_same(plain, checkpointed)
    assert plain[2] == 2 and checkpointed[2] == 4  # each block ran again in backward
    if method in ("prompt-tuning", "prefix-tuning"):  # the virtual tokens, behind frozen blocks, got a gradient
        assert any(g.abs().sum() > 0 for k, g in checkpointed[1].items() if "prompt_embeddings" in k)


@pytest.mark.parametrize("method", ["lora", "prefix-tuning"])
def test_dropout_is_on_so_the_recomputation_must_draw_the_same_masks(method):
    model = build(our_gpt, method)
    ids, mask = batch()
    assert step(model, True, ids, mask, seed=1)[0] != step(model, True, ids, mask, seed=2)[0]
    model.eval()  # eval mode never checkpoints: the forward keeps its activations
    with torch.no_grad():
        set_activation_checkpointing(model, True)
        on = model(ids)[0]
        set_activation_checkpointing(model, False)
        torch.testing.assert_close(on, model(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("make", [our_gpt, our_bert], ids=["gpt", "bert"])
@pytest.mark.parametrize("method", ["lora", "prefix-tuning"])
@pytest.mark.parametrize("backward_inside", [True, False], ids=["backward-inside", "backward-after"])
def test_a_mixed_batch_with_checkpointing_equals_without(make, method, backward_inside):
    model = build(make, method, names=("a", "b"))
    ids, mask = batch()
    names = ["b", "a", "b"]
    results = []
    for on in (False, True):
        set_activation_checkpointing(model, on)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with mixed_batch(model, names):
            loss = loss_of(model, ids, mask)
            if backward_inside:
                loss.backward()
        if not backward_inside:  # as a training loop does; the recomputation replays the rows' adapters
            loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert_same(*results)


@pytest.mark.parametrize("method", ["full", "prefix-tuning"])
def test_kv_cache_decoding_is_unaffected(method, counted):
    model = build(our_gpt, method, dropout=0.0)
    ids = torch.randint(1, V, (2, 5))
    outs = []
    for on in (False, True):
        set_activation_checkpointing(model, on)
        model.eval()
        outs.append(model.generate(ids, 6, temperature=0))
        model.train()  # a cached forward in training mode, grad on: the cache is written once, never checkpointed
        cache = model.new_kv_cache(2)
        first, second = model(ids[:, :3], kv_cache=cache)[0], model(ids[:, 3:], kv_cache=cache)[0]
        outs.append(torch.cat([first, second], dim=1).detach())
    assert not counted
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[3], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], model(ids)[0].detach(), rtol=1e-10, atol=1e-10)  # the cache read it right
    assert len(counted) == 2  # the same forward without a cache checkpoints both blocks


def saved_bytes(model, on: bool, ids, mask) -> int:
    set_activation_checkpointing(model, on)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids, mask)
    loss.backward()
    return total


@pytest.mark.parametrize("make", [our_gpt, our_bert], ids=["gpt", "bert"])
def test_fewer_bytes_are_saved_for_backward(make):
    model = build(make, "lora")
    ids, mask = batch()
    assert saved_bytes(model, True, ids, mask) < 0.7 * saved_bytes(model, False, ids, mask)


# ------------------------------------------------------------------------------------------ the setting, the jobs
def test_the_setting_round_trips_and_old_configs_load_without_it():
    run, model_cfg = resolve(None, None, {}, ["train.activation_checkpointing=true"])
    assert run.train.activation_checkpointing is True
    saved = json.loads(json.dumps(full_dict(run, model_cfg)))
    assert resolve(saved, None, {}, None)[0].train.activation_checkpointing is True
    del saved["train"]["activation_checkpointing"]  # a config.json written before the setting existed
    assert resolve(saved, None, {}, None)[0].train.activation_checkpointing is False
    cfg = resolve_finetune(None, None, {}, ["train.activation_checkpointing=true"])
    assert cfg.train.activation_checkpointing is True
    again = json.loads(json.dumps(to_dict(cfg)))
    assert resolve_finetune(again, None, {}, None).train.activation_checkpointing is True
    del again["train"]["activation_checkpointing"]
    assert resolve_finetune(again, None, {}, None).train.activation_checkpointing is False
    # one setting, one flag: the same type, default and help in both jobs' train sections
    fields = [{f.name: f for f in dataclasses.fields(c)} for c in (TrainConfig, FinetuneTrain)]
    fields = [f["activation_checkpointing"] for f in fields]
    assert fields[0].default is fields[1].default is False
    assert fields[0].metadata == fields[1].metadata and "less memory" in fields[0].metadata["help"]


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_pretrain_with_checkpointing_equals_the_run_without(tmp_path, capsys, counted):
    corpus = write_corpus(tmp_path / "corpus.txt")
    base = ["pretrain", "--data", corpus, *TINY, "--steps", 2, "--set", "model.dropout=0.1", "--set",
            "train.log_every=1"]  # fmt: skip
    assert main([str(a) for a in [*base, "--out", tmp_path / "plain"]]) == 0
    assert not counted
    on = ["--out", tmp_path / "ckpt", "--set", "train.activation_checkpointing=true"]
    assert main([str(a) for a in [*base, *on]]) == 0, capsys.readouterr().err
    assert len(counted) == 2  # one block, two steps
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["train"]["activation_checkpointing"] is True
    assert train_losses(tmp_path / "plain") == train_losses(tmp_path / "ckpt")


def test_finetune_turns_it_on_from_the_flag_and_from_set(tmp_path, capsys, counted):
    data = make_data(tmp_path)
    texts = [ln.split("\t")[0] for ln in data["train"].read_text().splitlines()[1:]]
    bert = make_bert_dir(tmp_path, texts)
    args = ["finetune", "--from", bert, "--train", data["train"], "--val", data["val"], "--steps", 1, "--batch-size",
            4, "--max-length", 16, "--method", "prefix-tuning", "--num-virtual-tokens", 2]  # fmt: skip
    ways = {"flag": ["--activation-checkpointing"], "set": ["--set", "train.activation_checkpointing=true"]}
    for out, extra in ways.items():
        counted.clear()
        assert main([str(a) for a in [*args, "--out", tmp_path / out, *extra]]) == 0, capsys.readouterr().err
        assert len(counted) == 4  # four layers, one step
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["finetune"]["train"]["activation_checkpointing"] is True
