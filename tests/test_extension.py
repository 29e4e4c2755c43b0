"""A task and a method written in this file alone, each added with one registry line, run through `finetune`,
`predict` and `compare` with no other edit; and every registered method's flags are in the --help of the jobs it
applies to, its settings round-trip through config.json, and a flag shared by two methods (or tasks) means one thing.

The toy task asks whether a text is long; the toy method is BitFit (Ben Zaken et al., 2021): only the biases train,
beside the task head. `compare` runs each method in a process of its own, which imports this module by name
(TINYGRAFT_PLUGINS, set by compare from the registries), so the registrations below reach it too.
"""

import dataclasses
import json
import re
import typing
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.train.finetune_fixtures import make_bert_dir, write_tsv
from tinygraft.cli.main import build_parser, main
from tinygraft.core.config import flag_name, setting, to_dict
from tinygraft.data import labeled as L
from tinygraft.models.heads import hidden_size
from tinygraft.tasks import TASKS, Scorer, Task, register
from tinygraft.tasks.base import DataSettings
from tinygraft.train import methods
from tinygraft.train.config import full_dict, resolve, resolve_finetune
from tinygraft.train.methods import Method


# ------------------------------------------------------------------------------------------------- the toy task
@dataclass
class LengthSettings:
    long_words: int = setting(8, "toy-length: a text of more words than this is long")


class LengthHead(nn.Module):
    pair_inputs = False
    pooling = "mean"
    num_labels = 1

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Linear(hidden, 1)

    def forward(self, features, batch):
        logit = self.score(features.pool("mean")).squeeze(-1)
        labels = batch.get("labels")
        loss = None if labels is None else F.binary_cross_entropy_with_logits(logit.float(), labels.float())
        return {"logits": logit}, loss


class LengthScorer(Scorer):
    def __init__(self):
        super().__init__()
        self.right = self.n = 0

    def collect(self, outputs, batch):
        if "labels" in batch:
            self.right += int(((outputs["logits"] > 0).float() == batch["labels"]).sum())
            self.n += len(batch["labels"])

    def metrics(self):
        return {"accuracy": self.right / self.n} if self.n else {}


class Length(Task):
    name = "toy-length"
    summary = "is a text long? (a task defined in a test file)"
    Settings = LengthSettings
    columns = ("text", None, None)

    def read(self, path, data, settings, labeled=True):
        text, _, _ = self.column_names(data)
        return L.read_labeled(path, text, None, quote_none=data.quote_none)

    def encode(self, examples, tokenizer, data, settings, label_map, source):
        feats = L.encode_classification(examples, tokenizer, data.max_length)
        for ex, f in zip(examples, feats):
            f["labels"] = float(len(ex.text.split()) > settings.long_words)
        return feats

    def make_head(self, backbone, settings, label_map, pooling):
        return LengthHead(hidden_size(backbone))

    def metric(self, settings):
        return "accuracy", True

    def scorer(self, settings, label_map, examples, features):
        return LengthScorer()

    def rows(self, examples, features, outs, settings, label_map):
        logits = torch.cat([o["logits"] for o, _ in outs])
        return [{"text": ex.text, "long": bool(z > 0)} for ex, z in zip(examples, logits)]


register(Length())


# ----------------------------------------------------------------------------------------------- the toy method
@dataclass
class BitFitSettings:
    head_lr_scale: float = setting(1.0, "bitfit: the head's learning rate, as a multiple of the biases'")


class BitFit(Method):
    """Only the biases (and a task model's head) train; every weight matrix stays as pretrained."""

    name = "bitfit"
    summary = "BitFit: the biases and the head train, nothing else (a method defined in a test file)"
    Settings = BitFitSettings
    jobs = frozenset({"pretrain", "finetune"})
    default_lr = 1e-3

    def _parts(self, model):
        head = list(model.head.parameters()) if hasattr(model, "head") else []
        ids = {id(p) for p in head}
        biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and id(p) not in ids]
        return biases, head

    def attach(self, model):
        model.requires_grad_(False)
        for p in (p for group in self._parts(model) for p in group):
            p.requires_grad_(True)
        return model

    def param_groups(self, model):
        biases, head = self._parts(model)
        groups = [{"params": biases, "lr_scale": 1.0, "name": "bias"}]
        return groups + ([{"params": head, "lr_scale": self.settings.head_lr_scale, "name": "head"}] if head else [])


methods.register(BitFit)


@pytest.fixture(scope="module", autouse=True)
def _registered_for_this_module_only():
    """The registries are process-wide: the toy task and method leave them when this module's tests are done."""
    yield
    TASKS.pop(Length.name, None)
    methods.METHODS.pop(BitFit.name, None)


# ------------------------------------------------------------------------------------------------------- runs
def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    words = "the model reads tokens and predicts the next one while the loss falls slowly".split()
    rows = [[" ".join(words[: 3 + (i * 5) % 11])] for i in range(40)]
    data = {
        "train": write_tsv(root / "train.tsv", ["text"], rows[:28]),
        "val": write_tsv(root / "val.tsv", ["text"], rows[28:]),
    }
    return {"bert": make_bert_dir(root, [r[0] for r in rows] * 3), **data}


def common(env):
    return [
        "--from",
        env["bert"],
        "--task",
        "toy-length",
        "--train",
        env["train"],
        "--val",
        env["val"],
        "--steps",
        3,
        "--batch-size",
        8,
        "--max-length",
        24,
    ]


def test_a_task_and_a_method_of_this_file_run_finetune_predict_and_compare(env, tmp_path, capsys):
    out = tmp_path / "bitfit"
    code, _, err = run(
        ["finetune", *common(env), "--method", "bitfit", "--head-lr-scale", 2, "--long-words", 6, "--out", out], capsys
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "toy-length" and results["method"] == "bitfit" and "accuracy" in results["metrics"]
    config = json.loads((out / "config.json").read_text())["finetune"]
    assert config["method_settings"] == {"head_lr_scale": 2.0} and config["task_settings"] == {"long_words": 6}
    biases = sum(p.numel() for n, p in _bert(env).named_parameters() if n.endswith(".bias"))
    assert results["trainable_params"] == biases + 32 + 1  # and the head's Linear(32, 1)

    code, stdout, err = run(["predict", out, "--input", env["val"]], capsys)
    assert code == 0 and "as a table with the run's columns" in err, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 12 and all(set(r) == {"text", "long"} for r in rows)

    code, stdout, err = run(
        ["compare", *common(env), "--methods", "bitfit,full", "--head-lr-scale", 2, "--out", tmp_path / "cmp"], capsys
    )
    assert code == 0, err
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["bitfit", "full"]
    child = json.loads((tmp_path / "cmp" / "bitfit" / "seed-0" / "config.json").read_text())["finetune"]
    assert child["method_settings"] == {"head_lr_scale": 2.0} and child["task"] == "toy-length"


def _bert(env):
    from tinygraft.models.pretrained import load_pretrained_model  # noqa: PLC0415 (only this helper needs it)

    return load_pretrained_model(env["bert"], "bert")


# ------------------------------------------------------------------------------------- flags and config.json
def help_of(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def flags_of(cls) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        flag = flag_name(f)
        out.append(f"--no-{flag}" if f.default is True else f"--{flag}")
    return out


def test_every_method_flag_is_in_the_help_of_each_job_it_applies_to():
    for name, cls in methods.METHODS.items():
        for job in cls.jobs:
            for command in ("finetune", "compare") if job == "finetune" else ("pretrain",):
                text = help_of(command)
                for flag in flags_of(cls.Settings):
                    assert re.search(rf"{re.escape(flag)}\b", text), (name, command, flag)
    for task in TASKS.values():
        for flag in flags_of(task.Settings):
            assert flag in help_of("finetune") and flag in help_of("compare"), (task.name, flag)
    assert "--head-lr-scale" in help_of("pretrain") and "--top-k" not in help_of("pretrain")


def test_a_shared_field_name_means_one_thing():
    """Among the methods (and among the tasks, whose settings live in their own section beside the data's), a field
    name is one flag with one type, default and help: two methods share --lora-r only if it means the same."""
    groups = [
        [c.Settings for c in methods.METHODS.values()],
        [*(t.Settings for t in TASKS.values()), DataSettings],
    ]
    for owners in groups:
        seen: dict[str, tuple] = {}
        flags: dict[str, str] = {}
        for cls in owners:
            for f in dataclasses.fields(cls):
                meaning = (flag_name(f), f.type, f.default, f.metadata.get("help"))
                assert seen.setdefault(f.name, meaning) == meaning, (cls.__name__, f.name, seen[f.name], meaning)
                assert flags.setdefault(flag_name(f), f.name) == f.name, (cls.__name__, flag_name(f))


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_settings_round_trip_through_config_json(name):
    cls = methods.METHODS[name]
    hints, changed = typing.get_type_hints(cls.Settings), {}
    for f in dataclasses.fields(cls.Settings):  # a value other than the default, of the field's type
        if typing.get_origin(hints[f.name]) is typing.Literal:  # another of its choices
            changed[f.name] = next(c for c in typing.get_args(hints[f.name]) if c != f.default)
            continue
        tp = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        changed[f.name] = {bool: not f.default, str: "query", int: 3, float: 0.5}[tp[0]]
        formed = {"prompt_init": "text:query", "template": "query: {text}", "label_text": "1=query"}
        changed[f.name] = formed.get(f.name, changed[f.name])  # a str with a form
    settings = methods.settings_for(cls.name, changed)
    if "finetune" in cls.jobs:  # a fine-tuning run's config.json "finetune" section, written and read back
        flags = {"method": cls.name, **{f"method_settings.{k}": v for k, v in changed.items()}}
        cfg = resolve_finetune(None, None, flags, None)
        saved = json.loads(json.dumps(to_dict(cfg)))
        again = resolve_finetune(saved, None, {}, None)
        assert cfg.method_settings == again.method_settings == settings and to_dict(again) == saved
    if "pretrain" in cls.jobs:  # a pre-training run's config.json, written and read back
        run, model_cfg = resolve(
            None,
            None,
            {"method": cls.name},
            [
                f"method_settings.{k}={json.dumps(v)}" if not isinstance(v, str) else f"method_settings.{k}={v}"
                for k, v in changed.items()
            ],
        )
        saved = json.loads(json.dumps(full_dict(run, model_cfg)))
        assert resolve(saved, None, {}, None)[0].method_settings == run.method_settings == settings
