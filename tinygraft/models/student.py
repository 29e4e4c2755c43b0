"""A DistilBERT-style student: the teacher with some of its blocks, every other tensor copied exactly.

    student = student_from_teacher(teacher, [0, 2, 4])    # blocks 0, 2 and 4 (0-based); default every other one

Sanh et al. 2019 (DistilBERT) start the student from the teacher's embeddings and one block in two; what comes
after the last block (GPT's final LayerNorm and tied LM head, BERT's pooler and masked-LM head, a TaskModel's task
head) is copied too, so the student starts as the teacher with blocks left out. The copy is a new model: training
the student never touches the teacher (issue 17's `tinygraft distill --student-from-teacher` builds on this).
"""

import copy
import dataclasses
from collections.abc import Sequence

from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT
from tinygraft.models.heads import TaskModel


def parse_layers(text: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4], in one sentence when it is not a list of integers."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TinygraftError(f"--student-from-teacher takes block numbers like 0,2,4; got {text!r}") from None


def _check(layers: Sequence[int], n_layer: int) -> list[int]:
    layers = list(layers)
    if not layers:
        raise TinygraftError("the student needs at least one of the teacher's blocks")
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise TinygraftError(f"block {bad[0]} is out of range: the teacher has blocks 0..{n_layer - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise TinygraftError(f"the student's blocks must be in increasing order without repeats; got {layers}")
    return layers


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if isinstance(model, GPT) else model.encoder.layer


def _backbone(model: nn.Module) -> nn.Module:
    return model.bert if isinstance(model, BERTForMaskedLM) else model


def student_from_teacher(teacher: nn.Module, layers: Sequence[int] | None = None) -> nn.Module:
    """A copy of `teacher` (GPT, BERT, BERTForMaskedLM or a TaskModel over one) keeping only blocks `layers`."""
    if isinstance(teacher, TaskModel):
        return TaskModel(student_from_teacher(teacher.backbone, layers), copy.deepcopy(teacher.head))
    if not isinstance(teacher, (GPT, BERT, BERTForMaskedLM)):
        raise TinygraftError(f"a student is built from a tinygraft GPT or BERT, not a {type(teacher).__name__}")
    n_layer = teacher.config.n_layer
    layers = _check(range(0, n_layer, 2) if layers is None else layers, n_layer)
    student = copy.deepcopy(teacher)  # every tensor, ties (GPT's head, BERT's decoder) kept by deepcopy's memo
    blocks = _blocks(_backbone(student))
    kept = nn.ModuleList([blocks[i] for i in layers])
    for j, block in enumerate(kept):  # GPT's attention indexes the KV cache by its block number
        attn = getattr(block, "attn", None)
        if attn is not None:
            attn.layer = j
    if isinstance(student, GPT):
        student.transformer.h = kept
    else:
        _backbone(student).encoder.layer = kept
    config = dataclasses.replace(teacher.config, n_layer=len(layers))
    student.config = config
    if isinstance(student, BERTForMaskedLM):
        student.bert.config = config
    return student
