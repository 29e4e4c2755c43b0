"""Distillation's losses beside the soft labels against hand-computed float64: the hidden-state loss through a
projection, MiniLM's attention and value relations (head counts that differ), each task's output loss, and the taps
that read a model's insides."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinygraft.errors import TinygraftError
from tinygraft.kernels.kd_loss import kd_divergence
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.tasks.classify import SequenceClassificationHead
from tinygraft.train import distill_losses as D

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_hidden_loss_through_a_projection_matches_the_sums_written_out():
    h_t, h_s = rand(2, 5, 6, seed=1), rand(2, 5, 4, seed=2)
    proj = torch.nn.Linear(4, 6, bias=False).double()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got_mse = D.hidden_loss(h_t, proj(h_s), mask, "mse")
    got_cos = D.hidden_loss(h_t, proj(h_s), mask, "cosine")
    mse, cos, n = 0.0, 0.0, 0
    proj.requires_grad_(False)
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                x, y = proj.weight @ h_s[b, t], h_t[b, t]
                mse += float(((x - y) ** 2).sum()) / 6
                cos += 1 - float(x @ y / (x.norm() * y.norm()))
                n += 1
    assert got_mse.item() == pytest.approx(mse / n, rel=1e-6)  # hidden_loss computes in fp32
    assert got_cos.item() == pytest.approx(cos / n, rel=1e-5, abs=1e-6)


def softmax_row(x, y, b, i, h, heads, keys):
    d = x.shape[-1] // heads
    xs, ys = x[b, i, h * d : (h + 1) * d], y[b, :, h * d : (h + 1) * d]
    return torch.softmax(torch.stack([xs @ ys[j] / math.sqrt(d) for j in keys]), 0)


def by_hand_relations(x_t, y_t, x_s, y_s, heads, mask, causal):
    """KL(teacher || student) of softmax(x y^T / sqrt(d)) per relation head, row by row."""
    B, T, _ = x_t.shape
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            n += 1
            keys = [j for j in range(T) if mask[b, j] and (not causal or j <= i)]
            for h in range(heads):
                p, q = softmax_row(x_t, y_t, b, i, h, heads, keys), softmax_row(x_s, y_s, b, i, h, heads, keys)
                total += float((p * (p.log() - q.log())).sum())
    return total / (n * heads)


@pytest.mark.parametrize("causal", [False, True])
def test_relations_match_the_formula_when_widths_and_heads_differ(causal):
    B, T = 2, 5
    q_t, k_t, v_t = (rand(B, T, 12, seed=s) for s in (1, 2, 3))  # teacher: width 12 (say 3 heads of 4)
    q_s, k_s, v_s = (rand(B, T, 8, seed=s) for s in (4, 5, 6))  # student: width 8 (2 heads of 4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = D.relation_loss((q_t, k_t, v_t), (q_s, k_s, v_s), 2, mask, causal)
    want = by_hand_relations(q_t, k_t, q_s, k_s, 2, mask, causal) + by_hand_relations(v_t, v_t, v_s, v_s, 2, mask,
                                                                                       causal)  # fmt: skip
    assert got.item() == pytest.approx(want, rel=1e-5)
    same = D.relation_loss((q_t, k_t, v_t), (q_t, k_t, v_t), 2, mask, causal)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_relation_heads_must_divide_both_widths():
    assert D.relation_heads(None, 384, 128, 4) == 4
    with pytest.raises(TinygraftError, match="relation heads do not divide"):
        D.relation_heads(5, 384, 128, 4)


def test_layer_map_default_is_uniform_and_bad_pairs_are_one_sentence():
    assert D.parse_layer_map(None, 6, 3) == [(0, 0), (2, 1), (4, 2), (6, 3)]
    assert D.parse_layer_map("0:0,6:2", 6, 2) == [(0, 0), (6, 2)]
    with pytest.raises(TinygraftError, match="the teacher has layers 0 .* to 6, not 7"):
        D.parse_layer_map("7:1", 6, 2)
    with pytest.raises(TinygraftError, match="the student has layers 0 .* to 2, not 3"):
        D.parse_layer_map("6:3", 6, 2)
    with pytest.raises(TinygraftError, match="TEACHER:STUDENT"):
        D.parse_layer_map("6-3", 6, 2)


def head(problem, n):
    return SequenceClassificationHead(8, n, problem=problem)


def test_classification_outputs_distil_by_the_divergence_bce_or_mse():
    s, t = rand(4, 3, seed=1).requires_grad_(), rand(4, 3, seed=2)
    got = D.output_loss(head("single_label", 3), {"logits": s}, {"logits": t}, {}, 2.0, "forward", 0.5)
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    assert got.item() == pytest.approx(float(4 * (p * (p.log() - q.log())).sum(-1).mean()), rel=1e-6)
    got = D.output_loss(head("multi_label", 3), {"logits": s}, {"logits": t}, {}, 2.0, "forward", 0.5)
    pt, ps = torch.sigmoid(t), torch.sigmoid(s)
    bce = -(pt * ps.log() + (1 - pt) * (1 - ps).log()).mean()
    assert got.item() == pytest.approx(float(bce), rel=1e-6)
    s1, t1 = s[:, :1], t[:, :1]
    got = D.output_loss(head("regression", 1), {"logits": s1}, {"logits": t1}, {}, 2.0, "forward", 0.5)
    assert got.item() == pytest.approx(float(((s1 - t1) ** 2).mean()), rel=1e-6)


def test_token_outputs_distil_only_the_labelled_tokens():
    s, t = rand(2, 4, 5, seed=1), rand(2, 4, 5, seed=2)
    labels = torch.tensor([[0, -100, 2, -100], [1, 1, -100, -100]])
    tagger = torch.nn.Module()  # a head without `problem`: the token task
    got = D.output_loss(tagger, {"logits": s}, {"logits": t}, {"labels": labels}, 1.0, "reverse", 0.5)
    keep = labels != -100
    assert got.item() == pytest.approx(float(kd_divergence(s[keep], t[keep], 1.0, "reverse")), rel=1e-9)


def test_span_outputs_ignore_the_padding_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s = {"start_logits": rand(2, 4, seed=1), "end_logits": rand(2, 4, seed=2)}
    t = {"start_logits": rand(2, 4, seed=3), "end_logits": rand(2, 4, seed=4)}
    got = D.output_loss(torch.nn.Module(), s, t, {"attention_mask": mask}, 1.0, "forward", 0.5)
    want = 0.0
    for key in ("start_logits", "end_logits"):
        for b in range(2):
            real = mask[b].bool()
            p, q = torch.softmax(t[key][b][real], 0), torch.softmax(s[key][b][real], 0)
            want += float((p * (p.log() - q.log())).sum()) / 4  # mean over 2 rows, then over start and end
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_similarity_distils_the_embeddings_by_cosine_and_mse():
    a_s, b_s = F.normalize(rand(3, 6, seed=1), dim=-1), F.normalize(rand(3, 6, seed=2), dim=-1)
    a_t, b_t = F.normalize(rand(3, 6, seed=3), dim=-1), F.normalize(rand(3, 6, seed=4), dim=-1)
    got = D.output_loss(torch.nn.Module(), {"embeddings_a": a_s, "embeddings_b": b_s},
                        {"embeddings_a": a_t, "embeddings_b": b_t}, {}, 1.0, "forward", 0.5)  # fmt: skip
    want = sum(float((1 - (s * t).sum(-1)).mean() + ((s - t) ** 2).mean()) for s, t in ((a_s, a_t), (b_s, b_t))) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)  # the teacher's side is read in fp32


def test_taps_read_the_embeddings_output_each_block_and_the_last_attention():
    torch.manual_seed(0)
    bert = BERT(BERTConfig(vocab_size=50, max_position_embeddings=16, n_layer=3, n_head=2, n_embd=32,
                           intermediate_size=40)).eval()  # fmt: skip
    ids = torch.randint(0, 50, (2, 7))
    with D.Tap(bert, [0, 1, 3], relations=True) as tap:
        out = bert(ids, output_hidden_states=True)
    for i in (0, 1, 3):
        torch.testing.assert_close(tap.hidden[i], out.hidden_states[i], rtol=0, atol=0)
    attn = bert.encoder.layer[-1].attention.self
    x = out.hidden_states[2]
    torch.testing.assert_close(tap.qkv[2], attn.value(x), rtol=0, atol=0)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    with D.Tap(gpt, [2], relations=True, final=gpt.lm_head) as tap:
        gpt(ids)
    torch.testing.assert_close(tap.final, gpt.hidden_states(ids), rtol=0, atol=0)
    assert tap.qkv[0].shape == (2, 7, 32) and len(tap.handles) == 3
    assert not gpt.lm_head._forward_pre_hooks  # removed when the forward ended
