"""A LoRA adapter exported from a BERT classifier, tagger or reader works in peft's task model of that type: its
keys sit under `base_model.model.bert.`, the head travels as modules_to_save, and the logits are ours.

Before, the export keyed the backbone for `BertModel` only: peft loaded none of its tensors into
`BertForSequenceClassification` and only warned.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.finetune_fixtures import demo_rows, make_bert_dir, make_data
from tinygraft.cli.main import main
from tinygraft.train import runs

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
peft = pytest.importorskip("peft", reason="peft is the reference LoRA implementation (dev extra)")

CASES = {  # task: (its flags, peft's task_type, the task model of transformers)
    "classify": (["--pooling", "pooler"], "SEQ_CLS", "BertForSequenceClassification"),
    "tokens": (["--train", "{tags}", "--val", "{tags}"], "TOKEN_CLS", "BertForTokenClassification"),
    "qa": (["--train", "{squad}", "--val", "{squad}"], "QUESTION_ANS", "BertForQuestionAnswering"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-task")
    train, _ = demo_rows()
    make_bert_dir(root, [t for t, _ in train])
    make_data(root)
    return root


def finetune(root, task, extra, name=""):
    data = {
        "train": root / "train.tsv",
        "val": root / "val.tsv",
        "tags": root / "tags.conll",
        "squad": root / "squad.json",
    }
    argv = ["finetune", "--from", root / "tiny-bert", "--task", task, "--method", "lora", "--lora-r", 2]
    argv += ["--steps", 4, "--batch-size", 8, "--lr", 0.05, "--seed", 3, "--out", root / f"run-{task}{name}"]
    if "--train" not in extra:
        argv += ["--train", data["train"], "--val", data["val"]]
    argv += [a.format(**data) for a in extra]
    assert main([str(a) for a in argv]) == 0
    return root / f"run-{task}{name}"


@pytest.mark.parametrize("task", sorted(CASES))
def test_peft_task_model_gives_our_logits(root, task, capsys):
    extra, task_type, model_class = CASES[task]
    run = finetune(root, task, extra)
    to = root / f"adapter-{task}"
    assert main(["export", str(run), "--adapter", str(to)]) == 0
    assert f"exported for peft's task_type {task_type}" in capsys.readouterr().out
    config = json.loads((to / "adapter_config.json").read_text())
    head_name = "qa_outputs" if task == "qa" else "classifier"
    assert config["task_type"] == task_type and config["modules_to_save"] == [head_name]
    keys = load_file(to / "adapter_model.safetensors")
    assert {f"base_model.model.{head_name}.weight", f"base_model.model.{head_name}.bias"} <= set(keys)
    assert all(k.startswith("base_model.model.bert.") for k in keys if ".lora_" in k)

    ours = runs.load(run).model.eval()
    num_labels = ours.head.num_labels
    base = getattr(transformers, model_class).from_pretrained(root / "tiny-bert", num_labels=num_labels)
    theirs = peft.PeftModel.from_pretrained(base, to).eval()

    ids = torch.randint(5, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    with torch.no_grad():
        out, _ = ours({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        got = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if task == "qa":
        pairs = [(out["start_logits"], got.start_logits), (out["end_logits"], got.end_logits)]
    else:
        pairs = [(out["logits"], got.logits)]
    for a, b in pairs:
        if a.dim() > 2 or task == "qa":  # per token: padding positions are not compared
            a, b = a[mask.bool()], b[mask.bool()]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the head and adapter were trained: the untouched base model's task head (random) disagrees
    with torch.no_grad():
        fresh = getattr(transformers, model_class).from_pretrained(root / "tiny-bert", num_labels=num_labels).eval()
        plain = fresh(input_ids=ids, attention_mask=mask, token_type_ids=types)
    plain_first = plain.start_logits if task == "qa" else plain.logits
    assert not torch.allclose(plain_first, got.start_logits if task == "qa" else got.logits, atol=1e-3)


def test_a_classifier_that_does_not_pool_with_the_pooler_exports_the_backbone_and_says_why(root, capsys):
    run = finetune(root, "classify", ["--pooling", "mean"], "-mean")
    assert main(["export", str(run), "--adapter", str(root / "adapter-mean")]) == 0
    out = capsys.readouterr().out
    assert "left out: no task model of peft + transformers computes it" in out and "--pooling pooler" in out
    config = json.loads((root / "adapter-mean" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] is None
