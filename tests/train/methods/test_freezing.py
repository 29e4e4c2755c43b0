"""The fine-tuning methods as the loop sees them: units, which parameters train at which step, the optimizer groups
and their learning rates (discriminative lr), eval mode under a linear probe, and the registry."""

import copy

import pytest
import torch

from tinygraft.data.labeled import collate
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.heads import TaskModel
from tinygraft.tasks import make_head
from tinygraft.train.methods import lookup, make_method
from tinygraft.train.methods.freezing import (
    BlockSettings,
    Full,
    GradualUnfreeze,
    GradualUnfreezeSettings,
    LinearProbe,
    TopK,
    TopKSettings,
    unit_names,
    units,
)
from tinygraft.train.methods.lora import LoRAMethod
from tinygraft.train.optim import build_optimizer, param_groups, set_lr


def FullFinetune(decay=None):
    return Full(BlockSettings(layer_lr_decay=decay))


def top_k(k, decay=None):
    return TopK(TopKSettings(layer_lr_decay=decay, top_k=k))


def gradual(every, decay=None):
    return GradualUnfreeze(GradualUnfreezeSettings(layer_lr_decay=decay, unfreeze_every=every))


L = 5  # blocks: an odd count, so no symmetry hides an off-by-one


def bert_model(pooling="pooler") -> TaskModel:
    bb = BERT(
        BERTConfig(vocab_size=53, max_position_embeddings=16, n_layer=L, n_head=2, n_embd=32, intermediate_size=40)
    )
    return TaskModel(bb, make_head("classify", bb, num_labels=3, pooling=pooling))


def gpt_model(pooling=None) -> TaskModel:
    bb = GPT(GPTConfig(vocab_size=53, block_size=16, n_layer=3, n_head=2, n_embd=32))
    return TaskModel(bb, make_head("classify", bb, num_labels=2, pooling=pooling))


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def prefixes(model, *starts) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(starts)}


def test_units_cover_every_parameter_once_top_first():
    for model, n_blocks in ((bert_model(), L), (gpt_model(), 3)):
        us = units(model)
        assert [n for n, _ in us] == ["head", *[f"block{i}" for i in reversed(range(n_blocks))], "embeddings"]
        ids = [id(p) for _, ps in us for p in ps]
        assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})  # GPT's tied wte once
    g = gpt_model()
    assert {id(p) for p in units(g)[0][1]} >= {id(p) for p in g.backbone.transformer.ln_f.parameters()}


def test_linear_probe_trains_only_the_head_with_the_backbone_in_eval_mode():
    model = bert_model()
    method = LinearProbe()
    model = method.attach(model)
    model.train()  # what the loop does at the start and after every evaluation
    method.apply_schedule(model, 0)
    assert trainable_names(model) == prefixes(model, "head.")
    assert not any(m.training for m in model.backbone.modules()) and model.head.training
    groups = method.param_groups(model)
    assert sum(p.numel() for g in groups for p in g["params"]) == 32 * 3 + 3
    # no dropout in the backbone: two forward passes give the same features
    ids = torch.randint(1, 53, (4, 9))
    f1, f2 = model.encode({"input_ids": ids}), model.encode({"input_ids": ids})
    torch.testing.assert_close(f1.hidden, f2.hidden, rtol=0, atol=0)


@pytest.mark.parametrize("k", [0, 1, 3, L])
def test_top_k_trains_the_head_and_the_last_k_blocks(k):
    model = top_k(k).attach(bert_model())
    blocks = tuple(f"backbone.encoder.layer.{i}." for i in range(L - k, L))
    assert trainable_names(model) == prefixes(model, "head.", "backbone.pooler.", *blocks)
    with pytest.raises(TinygraftError, match="more blocks than the model's 5"):
        top_k(L + 1).attach(bert_model())


def test_gradual_unfreeze_schedule_is_what_the_flags_say():
    model = bert_model()
    method = gradual(3)
    method.attach(model)
    order = unit_names(model)  # head, block4, block3, block2, block1, block0, embeddings
    for step in range(0, 3 * (L + 3)):
        method.apply_schedule(model, step)
        n = min(len(order), 1 + step // 3)
        on = {order[u] for u in range(n)}
        expect = prefixes(model, "head.", "backbone.pooler.") if "head" in on else set()
        for i in range(L):
            if f"block{i}" in on:
                expect |= prefixes(model, f"backbone.encoder.layer.{i}.")
        if "embeddings" in on:
            expect |= prefixes(model, "backbone.embeddings.")
        assert trainable_names(model) == expect, step
    # idempotent and order-free: a resumed run asks for step 7 directly
    method.apply_schedule(model, 7)
    assert trainable_names(model) == prefixes(
        model, "head.", "backbone.pooler.", "backbone.encoder.layer.4.", "backbone.encoder.layer.3."
    )
    assert method.schedule(model, 10) == [(0, "head"), (3, "block4"), (6, "block3"), (9, "block2")]
    # every unit is in the optimizer from the start (state appears when it unfreezes)
    listed = {id(p) for g in method.param_groups(model) for p in g["params"]}
    assert listed == {id(p) for p in model.parameters()}
    with pytest.raises(TinygraftError, match="unfreeze-every"):
        gradual(None).attach(bert_model())


@pytest.mark.parametrize("make", [lambda d: FullFinetune(d), lambda d: top_k(2, d), lambda d: gradual(4, d)])
def test_discriminative_lr_groups_and_rates(make):
    decay, base = 0.8, 1e-3
    model = bert_model()
    method = make(decay)
    model = method.attach(model)
    groups = method.param_groups(model)
    names = [g["name"] for g in groups]
    assert names == unit_names(model)[: len(groups)]
    for u, g in enumerate(groups):
        assert g["lr_scale"] == pytest.approx(decay**u)
    # through the loop's own group split and lr setter: every optimizer group runs at base * decay**unit
    opt = build_optimizer(param_groups(model, groups, 0.01), "torch", torch.device("cpu"), base, (0.9, 0.999), 1e-8)
    set_lr(opt, base)
    unit_of = {id(p): u for u, (_, ps) in enumerate(units(model)) for p in ps}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(base * decay ** unit_of[id(p)])
    if isinstance(method, Full):  # the embeddings get the lowest rate
        emb = {id(p) for p in model.backbone.embeddings.parameters()}
        low = min(g["lr"] for g in opt.param_groups)
        assert all(g["lr"] == pytest.approx(low) for g in opt.param_groups if id(g["params"][0]) in emb)
        assert low == pytest.approx(base * decay ** (L + 1))


def test_one_group_without_decay_and_bad_decay():
    model = FullFinetune().attach(bert_model())
    (g,) = FullFinetune().param_groups(model)
    assert len(g["params"]) == len(list(model.parameters())) and g["lr_scale"] == 1.0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(TinygraftError, match="layer-lr-decay"):
            FullFinetune(bad)


def test_registry_names_and_settings():
    assert lookup("top-2") == (TopK, {"top_k": 2})
    assert isinstance(make_method("full"), Full)
    assert isinstance(make_method("linear-probe", {"feature_cache": False}), LinearProbe)
    with pytest.raises(TinygraftError, match="--top-k does not apply to --method linear-probe"):
        make_method("linear-probe", {"top_k": 9})  # a setting of another method is named, not ignored
    assert make_method("top-3").settings.top_k == 3 and make_method("top-k", {"top_k": 1}).settings.top_k == 1
    assert make_method("top-k").settings.top_k == 2
    with pytest.raises(TinygraftError, match="top-3 means top_k=3"):
        make_method("top-3", {"top_k": 2})
    gu = make_method("gradual-unfreeze", {"unfreeze_every": 7, "layer_lr_decay": 0.5})
    assert gu.every == 7 and gu.settings.layer_lr_decay == 0.5
    with pytest.raises(TinygraftError, match="unknown method 'lorax'"):
        make_method("lorax")
    lora = make_method("lora", {"r": 4, "alpha": 8})
    assert isinstance(lora, LoRAMethod) and lora.settings.r == 4 and lora.settings.alpha == 8
    with pytest.raises(TinygraftError, match="--layer-lr-decay does not apply to --method lora"):
        make_method("lora", {"layer_lr_decay": 0.8})
    with pytest.raises(TinygraftError, match="pretrain trains with --method full, lora(, .*)?, not 'top-2'"):
        make_method("top-2", job="pretrain")


def test_gradual_unfreeze_with_a_parameter_free_head_starts_with_the_top_block():
    bb = BERT(
        BERTConfig(vocab_size=53, max_position_embeddings=16, n_layer=L, n_head=2, n_embd=32, intermediate_size=40)
    )
    model = TaskModel(bb, make_head("similarity", bb))  # cosine bi-encoder: no parameters of its own
    method = gradual(2)
    method.attach(model)
    top = f"backbone.encoder.layer.{L - 1}."
    assert trainable_names(model) == prefixes(model, "backbone.pooler.", top)
    method.apply_schedule(model, 2)
    assert trainable_names(model) == prefixes(model, "backbone.pooler.", top, f"backbone.encoder.layer.{L - 2}.")
    assert method.schedule(model, 5)[:3] == [(0, "head"), (0, f"block{L - 1}"), (2, f"block{L - 2}")]


@pytest.mark.parametrize(
    "family,pooling",
    [("bert", "cls"), ("bert", "mean"), ("bert", "max"), ("bert", "pooler"), ("gpt", "last"), ("gpt", "mean")],
)
def test_linear_probe_feature_cache_gives_the_uncached_outputs_without_the_backbone(family, pooling):
    """Epoch 1 runs the backbone and fills the cache; epoch 2, batched differently, reads every example from it (no
    block runs) and gives the logits the uncached model gives those same batches; an unseen example runs it again."""
    model = bert_model(pooling) if family == "bert" else gpt_model(pooling)
    plain = copy.deepcopy(model).eval()
    method = LinearProbe()
    model = method.attach(model)
    model.train()
    method.apply_schedule(model, 0)
    model.head.eval()  # the head's dropout off, to compare outputs
    calls = []
    model.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    lengths = [1, 7, 12, 3, 9, 16, 2, 5, 11, 4]  # awkward sizes: 1, 7, the block size 16
    feats = [
        {"input_ids": torch.randint(1, 53, (n,)).tolist(), "token_type_ids": [i % 2] * n, "labels": i % 2}
        for i, n in enumerate(lengths)
    ]
    if family == "gpt":
        feats = [{k: v for k, v in f.items() if k != "token_type_ids"} for f in feats]

    def logits(m, idx):
        with torch.no_grad():
            return m(collate([feats[i] for i in idx], 0))[0]["logits"]

    for idx in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        torch.testing.assert_close(logits(model, idx), logits(plain, idx), rtol=0, atol=1e-6)
    assert len(calls) == 3 and model.pooled_cache.misses == 10
    for idx in ([9, 3, 5], [0, 8], [7, 1, 2, 6, 4]):
        torch.testing.assert_close(logits(model, idx), logits(plain, idx), rtol=0, atol=1e-5)
    assert len(calls) == 3 and model.pooled_cache.hits == 10
    feats.append({**feats[2], "input_ids": feats[2]["input_ids"][::-1]})  # same length, new tokens
    torch.testing.assert_close(logits(model, [10, 2]), logits(plain, [10, 2]), rtol=0, atol=1e-5)
    assert len(calls) == 4
    model.train()  # a backbone in train mode (dropout) is never served from the cache
    model.head.eval()
    logits(model, [0, 1])
    assert len(calls) == 5


def test_no_feature_cache_and_heads_that_do_not_pool():
    assert make_method("linear-probe", {"feature_cache": False}).attach(bert_model()).pooled_cache is None
    bb = BERT(BERTConfig(vocab_size=53, max_position_embeddings=16, n_layer=2, n_head=2, n_embd=32))
    for task, kw in (("tokens", {"num_labels": 3}), ("qa", {})):
        assert LinearProbe().attach(TaskModel(bb, make_head(task, bb, **kw))).pooled_cache is None
