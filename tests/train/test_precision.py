"""bf16 autocast on the CPU in the training loop (master weights and optimizer state stay fp32, checkpoints load
into an fp32 run, resume is exact), and the length buckets --compile pads to (no loss or gradient changes)."""

import json

import numpy as np
import pytest
import torch

from tests.train.finetune_fixtures import make_env
from tests.train.test_loop import make_job, quiet, small_cfg
from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.data import labeled as L
from tinygraft.models.heads import TaskModel
from tinygraft.models.pretrained import load_pretrained
from tinygraft.tasks import make_head
from tinygraft.train.loop import train
from tinygraft.train.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(path):
    run = RunDir(path)
    run.prepare(resume=False, overwrite=False)
    return run


def watched(job, seen: list):
    """The job with a loss that records the dtype autocast gives a matmul while it runs."""
    inner = job.loss_fn

    def loss_fn(m, batch):
        seen.append((torch.randn(2, 2) @ torch.randn(2, 2)).dtype)
        return inner(m, batch)

    job.loss_fn = loss_fn
    return job


def test_bf16_steps_keep_master_weights_and_optimizer_state_fp32(tmp_path, monkeypatch):
    cfg = small_cfg(steps=2, eval_every=2, precision="bf16")
    seen: list = []
    job = watched(make_job(cfg, dropout=0.1), seen)
    grads = {}
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):  # the optimizer sees fp32 gradients
        grads.update({id(p): p.grad.dtype for g in self.param_groups for p in g["params"] if p.grad is not None})
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = train(job, cfg, fresh(tmp_path / "bf16"), progress=quiet())
    assert out.results["precision"] == "bf16" and seen == [torch.bfloat16, torch.bfloat16]
    assert grads and set(grads.values()) == {torch.float32}
    assert {p.dtype for p in job.model.parameters()} == {torch.float32}
    ckpt = checkpoint.load(tmp_path / "bf16")
    assert {t.dtype for t in ckpt.model.values()} == {torch.float32}
    state = [t for s in ckpt.optimizer["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert state and {t.dtype for t in state} == {torch.float32}


def test_a_bf16_checkpoint_resumes_in_fp32_and_bf16_differs_from_fp32(tmp_path):
    bf16, fp32 = small_cfg(precision="bf16"), small_cfg(precision="fp32")
    run = fresh(tmp_path / "mixed")
    train(make_job(bf16), bf16, run, stop_at=6, progress=quiet())
    seen: list = []
    out = train(watched(make_job(fp32), seen), fp32, run, resume=checkpoint.load(run.path), progress=quiet())
    assert out.status == "completed" and out.step == 12 and out.results["precision"] == "fp32"
    assert set(seen) == {torch.float32}
    straight = train(make_job(fp32), fp32, fresh(tmp_path / "fp32"), progress=quiet())
    a, b = out.results["metrics"]["loss"], straight.results["metrics"]["loss"]
    assert a != b and a == pytest.approx(b, rel=0.05)  # bf16 rounding changed the path, not the outcome


def test_resume_is_exact_in_bf16(tmp_path):
    cfg = small_cfg(precision="bf16")
    straight = fresh(tmp_path / "straight")
    train(make_job(cfg, dropout=0.1), cfg, straight, progress=quiet())
    split = fresh(tmp_path / "split")
    train(make_job(cfg, dropout=0.1), cfg, split, stop_at=6, progress=quiet())
    torch.manual_seed(999)
    np.random.seed(999)
    train(make_job(cfg, dropout=0.1, seed=5), cfg, split, resume=checkpoint.load(split.path), progress=quiet())
    a, b = checkpoint.load(straight.path).model, checkpoint.load(split.path).model
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------------ length buckets
def test_collate_pads_to_the_bucket_capped_at_the_max_length():
    feats = [{"input_ids": [5] * n, "token_type_ids": [0] * n, "labels": [1] * n} for n in (3, 17)]
    feats += [{"input_ids": [5] * 7, "token_type_ids": [0] * 7, "labels": [1] * 7}]
    assert L.collate(feats, 0)["input_ids"].shape == (3, 17)
    batch = L.collate(feats, 0, multiple=16)
    assert {k: tuple(batch[k].shape) for k in ("input_ids", "attention_mask", "token_type_ids", "labels")} == {
        k: (3, 32) for k in ("input_ids", "attention_mask", "token_type_ids", "labels")
    }
    assert batch["attention_mask"].sum().item() == 27 and (batch["labels"] == -100).sum().item() == 3 * 32 - 27
    assert L.collate(feats, 0, multiple=16, cap=20)["input_ids"].shape == (3, 20)
    assert L.collate(feats, 0, multiple=16, cap=10)["input_ids"].shape == (3, 17)  # never cut a row
    pairs = [{"input_ids_a": [1] * 3, "input_ids_b": [1] * 18, "labels": 0.5}]
    pb = L.collate(pairs, 0, multiple=16)
    assert pb["input_ids_a"].shape == (1, 16) and pb["input_ids_b"].shape == (1, 32)
    assert pb["attention_mask_b"].shape == (1, 32)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("precision"))


def test_finetune_in_bf16_then_resumed_in_fp32_and_the_first_line_says_so(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--from", tiny_dirs["bert"], "--out", out, "--train", tiny_dirs["train"], "--val",
            tiny_dirs["val"], "--steps", 4, "--batch-size", 8, "--max-length", 32, "--eval-every", 2]  # fmt: skip
    assert main([str(a) for a in [*args, "--precision", "bf16", "--stop-at", 2]]) == 0
    err = capsys.readouterr().err
    assert "bf16 autocast (emulated: this CPU has no native bf16" in err  # the suite pins TINYGRAFT_CPU_BF16=0
    ckpt = checkpoint.load(out)
    assert ckpt.config["train"]["precision"] == "bf16" and {t.dtype for t in ckpt.model.values()} == {torch.float32}
    assert main(["finetune", "--out", str(out), "--resume", "--precision", "fp32"]) == 0
    assert "fp32 (asked for)" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == "fp32" and results["step"] == 4 and results["compile_seconds"] == 0.0


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    _, loss = model(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "gpt"])
@pytest.mark.parametrize("task", ["classify", "tokens"])
def test_a_batch_padded_to_its_bucket_gives_the_same_loss_and_gradients(tiny_dirs, family, task):
    pre = load_pretrained(tiny_dirs[family])
    torch.manual_seed(0)
    pooling = "last" if family == "gpt" else "mean"
    head = make_head(task, pre.model, num_labels=3, **({"pooling": pooling} if task == "classify" else {}))
    model = TaskModel(pre.model, head).eval()  # eval: dropout would draw masks of another shape
    rng = np.random.default_rng(0)
    lengths = [5, 11, 2, 13, 9]
    feats = []
    for n in lengths:
        ids = rng.integers(5, pre.tokenizer.vocab_size, n).tolist()
        labels = rng.integers(0, 3, n).tolist() if task == "tokens" else int(rng.integers(0, 3))
        feats.append({"input_ids": ids, "labels": labels})
    plain = L.collate(feats, pre.tokenizer.pad_id or 0)
    bucket = L.collate(feats, pre.tokenizer.pad_id or 0, multiple=L.BUCKET, cap=40)
    assert plain["input_ids"].shape[1] == 13 and bucket["input_ids"].shape[1] == 16
    loss_a, grads_a = loss_and_grads(model, plain)
    loss_b, grads_b = loss_and_grads(model, bucket)
    tol = 1e-6 * 13  # fp32, sums over a few rows of a 32-wide model
    torch.testing.assert_close(loss_b, loss_a, atol=tol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=tol, rtol=1e-4, msg=k)
