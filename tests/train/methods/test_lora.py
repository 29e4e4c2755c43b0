"""LoRA as a method of the loop: adapter-only checkpoints, a frozen base, exact resume, the base's hash, export
(merged, and peft's adapter layout checked against peft on transformers' GPT-2 built from the same base)."""

import hashlib
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygraft.cli.export import run as export_command
from tinygraft.cli.flags import given
from tinygraft.cli.main import build_parser
from tinygraft.core import checkpoint
from tinygraft.core.config import to_dict
from tinygraft.errors import TinygraftError
from tinygraft.infer.export import export_adapter, export_run
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.heads import TaskModel
from tinygraft.models.pretrained import load_pretrained_model
from tinygraft.peft.adapters import parse_targets
from tinygraft.peft.files import read_adapter_config
from tinygraft.peft.lora import LoRAConfig, lora_layers, lora_state_dict
from tinygraft.tasks import make_head
from tinygraft.train import methods, runs
from tinygraft.train.config import TrainConfig
from tinygraft.train.loop import Job, seed_everything, train
from tinygraft.train.methods import Full
from tinygraft.train.methods.adapter import check_base, read_base_record
from tinygraft.train.methods.lora import LoRAMethod
from tinygraft.train.progress import Progress
from tinygraft.train.run_dir import RunDir

VOCAB, T = 61, 16


class WindowBatcher:
    """Random (x, y) windows with their own generator, position restorable (a stand-in for the data batchers)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seed: int):
        self.tokens, self.B = tokens, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self):
        ix = self.rng.integers(0, len(self.tokens) - T - 1, self.B)
        x = np.stack([self.tokens[i : i + T] for i in ix]).astype(np.int64)
        y = np.stack([self.tokens[i + 1 : i + 1 + T] for i in ix]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]


TOKENS = np.random.default_rng(1).integers(0, VOCAB, 2001).astype(np.uint16)


def cfg(steps=4, **kw):
    return TrainConfig(
        steps=steps,
        batch_size=4,
        seq_len=T,
        lr=1e-2,
        warmup_steps=0,
        eval_every=2,
        eval_batches=1,
        log_every=1,
        device="cpu",
        **kw,
    )


def make_job(base_dir, method, c: TrainConfig) -> Job:
    model = load_pretrained_model(base_dir, "gpt")
    val = torch.from_numpy(TOKENS[-T * 4 - 1 :].astype(np.int64))

    def evaluate(m):
        loss = float(m(val[:-1].view(4, T), val[1:].view(4, T))[1])
        return {"loss": loss, "perplexity": math.exp(loss)}

    return Job(
        model=model,
        method=method,
        batcher=WindowBatcher(TOKENS, c.batch_size, c.seed),
        loss_fn=lambda m, b: m(b[0], b[1])[1],
        evaluate=evaluate,
        count_tokens=lambda b: b[0].numel(),
        config={"train": {"steps": c.steps}, "method": method.name},
    )


def lora(base=None, **settings) -> LoRAMethod:
    return LoRAMethod(LoRAConfig(**settings), base=base)


def run_lora(base_dir, out, c, method=None, **kw):
    method = method or lora(base_dir, r=4, alpha=8, dropout=0.1, targets="c_attn,c_fc")
    seed_everything(c.seed)  # as a job does before building its model: the adapters' init draws from it
    job = make_job(base_dir, method, c)
    run = RunDir(out)
    run.prepare(resume="resume" in kw, overwrite=False)
    outcome = train(job, c, run, progress=Progress(total=1, initial=0, enabled=False), **kw)
    return job, outcome


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("base") / "gpt"
    GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    job, outcome = run_lora(base_dir, out, cfg())
    return SimpleNamespace(out=out, job=job, outcome=outcome)


def ids(n=3):
    return torch.randint(0, VOCAB, (n, 11), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_only_the_adapter_and_the_base_record(trained, base_dir):
    step = checkpoint.resolve(trained.out)
    tensors = load_file(step / "model.safetensors")
    wrapped = [path for path, _ in lora_layers(trained.job.model)]
    assert len(wrapped) == 4 and all(p.endswith(("attn.c_attn", "mlp.c_fc")) for p in wrapped)
    assert sorted(tensors) == sorted(f"{p}.lora_{ab}.weight" for p in wrapped for ab in "AB")
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert (step / "model.safetensors").stat().st_size < adapter_bytes + 4096  # tensors + header, no base weights
    assert (step / "model.safetensors").stat().st_size < (base_dir / "model.safetensors").stat().st_size / 5
    record = read_base_record(step)
    assert record["path"] == str(base_dir.resolve()) and record["model"] == "gpt"
    assert record["sha256"] == hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()
    config = read_adapter_config(step)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    results = json.loads((trained.out / "results.json").read_text())
    assert results["method"] == "lora" and results["trainable_params"] == sum(t.numel() for t in tensors.values())
    # only the adapter has optimizer state: exp_avg and exp_avg_sq, plus a scalar step per tensor
    assert 2 * adapter_bytes <= results["optimizer_state_mb"] * 2**20 <= 2 * adapter_bytes + 8 * len(tensors)


def test_frozen_base_is_bit_identical_after_training(trained, base_dir):
    fresh = load_pretrained_model(base_dir, "gpt")
    own = dict(fresh.named_parameters())
    moved = 0
    for name, p in trained.job.model.named_parameters():
        if ".lora_" in name:
            moved += int(name.endswith("lora_B.default.weight") and p.abs().max() > 0)
            continue
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, own[name.replace(".base.", ".")]), name
    assert moved == 4  # B left zero: the adapters trained


def test_resume_from_a_lora_checkpoint_continues_exactly(base_dir, tmp_path):
    straight, _ = run_lora(base_dir, tmp_path / "straight", cfg(steps=6))
    _, first = run_lora(base_dir, tmp_path / "split", cfg(steps=6), stop_at=3)
    assert first.status == "stopped"
    ckpt = checkpoint.load(tmp_path / "split")
    assert ckpt.step == 3
    resumed, outcome = run_lora(
        base_dir, tmp_path / "split", cfg(steps=6), LoRAMethod.from_checkpoint(ckpt.path), resume=ckpt
    )
    assert outcome.step == 6
    a, b = lora_state_dict(straight.model), lora_state_dict(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_a_changed_base_is_refused_in_one_sentence(base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    run_lora(base_dir=base, out=tmp_path / "run", c=cfg(steps=2))
    step = checkpoint.resolve(tmp_path / "run")
    LoRAMethod.from_checkpoint(step).attach(load_pretrained_model(base, "gpt"))  # unchanged: accepted
    weights = load_file(base / "model.safetensors")
    weights["transformer.h.0.attn.c_attn.weight"][0, 0] += 1e-3
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TinygraftError) as err:
        LoRAMethod.from_checkpoint(step).attach(load_pretrained_model(base, "gpt"))
    message = str(err.value)
    recorded = read_base_record(step)["sha256"]
    assert str(base.resolve()) in message and "changed" in message and recorded[:16] in message
    assert message.count(". ") == 0 and "\n" not in message
    with pytest.raises(TinygraftError, match="changed"):
        export_run(tmp_path / "run", tmp_path / "hf")
    shutil.rmtree(base)
    with pytest.raises(TinygraftError, match="no longer exists"):
        check_base(base, recorded)


# ------------------------------------------------------------------------------------------------ export
def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def test_export_merged_equals_the_unmerged_model(trained, tmp_path, capsys):
    args = SimpleNamespace(run=str(trained.out), to=str(tmp_path / "merged"), merged=True, adapter=None)
    assert export_command(args) == 0
    assert "merged" in capsys.readouterr().out
    step = checkpoint.resolve(trained.out)
    ckpt = checkpoint.load(step)
    unmerged, _, _ = runs.adapted_model(step, ckpt.model, build=None)
    assert next(lora_layers(unmerged), None) is not None
    merged = load_pretrained_model(tmp_path / "merged", "gpt")
    assert next(lora_layers(merged), None) is None
    x = ids()
    want = logits(unmerged.eval(), x)
    torch.testing.assert_close(logits(merged, x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(trained.job.model.eval(), x), want, rtol=0, atol=0)
    base = load_pretrained_model(read_base_record(step)["path"], "gpt")
    assert (logits(base, x) - want).abs().max() > 1e-3  # the adapter changed the outputs


def test_peft_loads_the_exported_adapter_and_matches_the_merged_export(trained, base_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
    peft = pytest.importorskip("peft", reason="peft is the reference LoRA implementation (dev extra)")
    export_run(trained.out, tmp_path / "merged", merged=True)
    assert export_command(SimpleNamespace(run=str(trained.out), to=None, adapter=str(tmp_path / "adapter"))) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert f"base {base_dir.resolve()}" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["base_model_name_or_path"] == str(base_dir.resolve())
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    x = ids()
    torch.testing.assert_close(logits(theirs, x), logits(merged, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(theirs, x), logits(trained.job.model.eval(), x), rtol=1e-4, atol=1e-5)


def test_export_refuses_what_it_cannot_do(trained, tmp_path):
    with pytest.raises(TinygraftError, match="--to DIR"):
        export_command(SimpleNamespace(run=str(trained.out), to=None, adapter=None))
    with pytest.raises(TinygraftError, match="not empty"):
        export_adapter(trained.out, trained.out)

    run_lora(trained.job.method.base, tmp_path / "full", cfg(steps=1), Full())
    with pytest.raises(TinygraftError, match="is not an adapter run, so there is no adapter to merge"):
        export_run(tmp_path / "full", tmp_path / "hf", merged=True)
    with pytest.raises(TinygraftError, match="is not an adapter run, so it has no adapter"):
        export_adapter(tmp_path / "full", tmp_path / "adapter")


# ---------------------------------------------------------------------------- a task model, and no base file
def tiny_bert_task(base):
    return TaskModel(
        load_pretrained_model(base, "bert"), make_head("classify", BERT(BERT_CFG), num_labels=3, pooling="mean")
    )


BERT_CFG = BERTConfig(
    vocab_size=50,
    max_position_embeddings=16,
    n_layer=1,
    n_head=2,
    n_embd=32,
    intermediate_size=24,
    dropout=0.0,
    attention_dropout=0.0,
)


def test_task_model_trains_its_head_and_saves_adapter_plus_head_strictly(tmp_path):
    torch.manual_seed(5)
    BERT(BERT_CFG).save_pretrained(tmp_path / "bert")
    model = tiny_bert_task(tmp_path / "bert")
    method = lora(tmp_path / "bert", r=2, alpha=4, targets="query,value")
    model = method.attach(model)
    groups = method.param_groups(model)
    assert [g["name"] for g in groups] == ["lora", "head"]
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    assert {id(p) for p in model.parameters() if p.requires_grad} == head | {id(p) for p in groups[0]["params"]}
    opt = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    batch = {"input_ids": torch.randint(0, 50, (3, 7)), "labels": torch.tensor([0, 2, 1])}
    for _ in range(2):
        model(batch)[1].backward()
        opt.step()
        opt.zero_grad()
    state = method.state_dict(model)
    assert sorted(k for k in state if k.startswith("head.")) == ["head.classifier.bias", "head.classifier.weight"]
    assert all(k.startswith("backbone.encoder.layer.0.attention.self.") for k in state if not k.startswith("head."))
    assert len(state) == 2 + 4
    again = lora(tmp_path / "bert", r=2, alpha=4, targets="query,value")
    other = again.attach(tiny_bert_task(tmp_path / "bert"))
    assert again.load_state_dict(other, state) == []
    model.eval(), other.eval()
    torch.testing.assert_close(other(batch)[0]["logits"], model(batch)[0]["logits"], rtol=0, atol=0)
    with pytest.raises(TinygraftError, match="lacks 'head.classifier.bias'"):
        again.load_state_dict(other, {k: v for k, v in state.items() if k != "head.classifier.bias"})
    with pytest.raises(TinygraftError, match="lacks"):
        again.load_state_dict(other, {k: v for k, v in state.items() if "lora_A" not in k})
    with pytest.raises(TinygraftError, match="neither an adapter nor head"):
        again.load_state_dict(other, {**state, "embeddings.word_embeddings.weight": torch.zeros(50, 32)})
    files = again.extra_files(other)
    assert json.loads(files["base.json"])["adapter_in"] == "backbone."
    assert sorted(json.loads(files["adapter_config.json"])["target_modules"]) == ["query", "value"]


def test_a_base_without_a_file_is_kept_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model_cfg = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=1, n_embd=16)
    model = GPT(model_cfg)
    method = lora(r=2, targets=r"transformer\.h\.0\.attn\.c_attn")
    method.attach(model)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    state = method.state_dict(model)
    assert "transformer.h.0.attn.c_attn.base.weight" in state and "transformer.wte.weight" in state
    config = {"preset": "gpt-tiny", "model": to_dict(model_cfg)}
    step = checkpoint.save(
        tmp_path, 1, model=state, trainer_state={}, config=config, extra_files=method.extra_files(model)
    )
    assert read_base_record(step)["path"] is None
    again, _, _ = runs.adapted_model(step, checkpoint.load(step).model, lambda: GPT(model_cfg))
    x = ids()
    torch.testing.assert_close(logits(again.eval(), x), logits(model.eval(), x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ CLI options
def test_cli_options_build_the_method():
    parser = build_parser()

    def settings(*flags):
        ns = parser.parse_args(["finetune", "--out", "x", "--method", "lora", *flags])
        given_ms = {k.split(".", 1)[1]: v for k, v in given(ns).items() if k.startswith("method_settings.")}
        return methods.settings_for("lora", given_ms)

    defaults = settings()
    assert defaults == LoRAConfig() and defaults.r == 8 and defaults.targets == "all-linear"
    s = settings(
        "--lora-r",
        "4",
        "--lora-alpha",
        "2",
        "--lora-dropout",
        "0.05",
        "--lora-targets",
        "c_attn, c_proj",
        "--lora-rslora",
    )
    assert (s.r, s.alpha, s.dropout, s.use_rslora, s.scaling) == (4, 2.0, 0.05, True, 1.0)
    assert parse_targets(s.targets) == ["c_attn", "c_proj"]
    assert parse_targets(r".*\.attn\.c_attn") == r".*\.attn\.c_attn"
    with pytest.raises(TinygraftError, match="neither a list of module names nor a valid regex"):
        parse_targets("c_attn(")
    with pytest.raises(TinygraftError, match="rank r must be a positive integer"):
        settings("--lora-r", "0")


def test_lora_plus_puts_b_in_its_own_faster_group(tmp_path):
    torch.manual_seed(5)
    BERT(BERT_CFG).save_pretrained(tmp_path / "bert")
    method = lora(tmp_path / "bert", r=2, alpha=4, targets="query,value", lora_plus_ratio=16)
    model = method.attach(tiny_bert_task(tmp_path / "bert"))
    groups = method.param_groups(model)
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("lora", 1.0), ("lora_B", 16.0), ("head", 1.0)]
    b = {id(layer.lora_B["default"].weight) for _, layer in lora_layers(model.backbone)}
    assert {id(p) for p in groups[1]["params"]} == b and not b & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) == len(b)  # the A matrices
    plain = lora(tmp_path / "bert", targets="query")
    assert [g["name"] for g in plain.param_groups(plain.attach(tiny_bert_task(tmp_path / "bert")))] == ["lora", "head"]
    with pytest.raises(TinygraftError, match="--lora-plus-ratio must be a positive number"):
        LoRAConfig(lora_plus_ratio=0)
