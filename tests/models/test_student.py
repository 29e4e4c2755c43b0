"""student_from_teacher: the chosen blocks and everything else copied exactly, ties kept, the teacher untouched."""

import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, GPT, BERTConfig, BERTForMaskedLM, GPTConfig
from tinygraft.models.heads import TaskModel
from tinygraft.models.student import parse_layers, student_from_teacher
from tinygraft.tasks import make_head

V = 61


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=24, n_layer=5, n_head=2, n_embd=32)).eval()


def mlm():
    torch.manual_seed(1)
    cfg = BERTConfig(vocab_size=V, max_position_embeddings=24, n_layer=5, n_head=2, n_embd=32, intermediate_size=37)
    return BERTForMaskedLM(cfg).eval()


def blocks(model):
    return model.transformer.h if isinstance(model, GPT) else (getattr(model, "bert", model)).encoder.layer


@pytest.mark.parametrize("build", [gpt, mlm])
@pytest.mark.parametrize("layers", [None, [0, 2, 4], [1], [0, 1, 2, 3, 4]])
def test_the_student_copies_exactly_the_chosen_tensors(build, layers):
    teacher = build()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, layers)
    chosen = [0, 2, 4] if layers is None else layers
    assert student.config.n_layer == len(chosen) and teacher.config.n_layer == 5
    t_state, s_state = teacher.state_dict(), student.state_dict()
    prefix = "transformer.h." if isinstance(teacher, GPT) else "bert.encoder.layer."
    for key, value in s_state.items():
        if key.startswith(prefix):
            j, rest = key[len(prefix) :].split(".", 1)
            source = f"{prefix}{chosen[int(j)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_state[source]), key
        assert value.data_ptr() != t_state[source].data_ptr(), key  # a copy, not a view of the teacher
    assert len(s_state) == len(t_state) - (5 - len(chosen)) * len([k for k in t_state if k.startswith(prefix + "0.")])
    out = student.get_output_embeddings().weight
    emb = student.transformer.wte.weight if isinstance(student, GPT) else student.bert.embeddings.word_embeddings.weight
    assert out is emb  # the tied head ties to the student's own embedding
    ids = torch.randint(1, V, (2, 9))
    if chosen == [0, 1, 2, 3, 4]:
        torch.testing.assert_close(student(ids)[0], teacher(ids)[0], rtol=0, atol=0)
    torch.optim.SGD(student.parameters(), lr=0.1).zero_grad()
    student(ids)[0].square().mean().backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher untouched


def test_a_gpt_student_decodes_with_its_cache_and_saves(tmp_path):
    student = student_from_teacher(gpt(), [1, 3])
    ids = torch.randint(1, V, (2, 6))
    full = student(ids)[0]
    cache = student.new_kv_cache(2)
    with torch.no_grad():
        parts = [student(ids[:, :4], kv_cache=cache)[0], student(ids[:, 4:], kv_cache=cache)[0]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-6)
    student.save_pretrained(tmp_path / "s")
    again = GPT.from_pretrained(tmp_path / "s")
    assert again.config.n_layer == 2
    torch.testing.assert_close(again(ids)[0], full.detach())


def test_a_task_models_head_and_a_bert_pooler_are_copied():
    torch.manual_seed(2)
    bert = BERT(BERTConfig(vocab_size=V, max_position_embeddings=24, n_layer=4, n_head=2, n_embd=32,
                           intermediate_size=37)).eval()  # fmt: skip
    teacher = TaskModel(bert, make_head("classify", bert, num_labels=3, pooling="pooler"))
    student = student_from_teacher(teacher, [0, 3])
    t_head, s_head = teacher.head.state_dict(), student.head.state_dict()
    assert t_head.keys() == s_head.keys() and all(torch.equal(t_head[k], s_head[k]) for k in t_head)
    assert student.head is not teacher.head
    assert torch.equal(student.backbone.pooler.dense.weight, bert.pooler.dense.weight)
    assert student.backbone.config.n_layer == 2 and len(student.blocks) == 2
    batch = {"input_ids": torch.randint(1, V, (2, 7))}
    assert student(batch)[0]["logits"].shape == (2, 3)


def test_bad_layer_lists_are_one_sentence():
    with pytest.raises(TinygraftError, match="block 5 is out of range: the teacher has blocks 0..4"):
        student_from_teacher(gpt(), [0, 5])
    with pytest.raises(TinygraftError, match="increasing order without repeats"):
        student_from_teacher(gpt(), [2, 2])
    with pytest.raises(TinygraftError, match="at least one"):
        student_from_teacher(gpt(), [])
    with pytest.raises(TinygraftError, match="block numbers like 0,2,4"):
        parse_layers("0,two")
    assert parse_layers("0, 2,4") == [0, 2, 4]
