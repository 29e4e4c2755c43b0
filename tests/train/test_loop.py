"""The training loop on a tiny GPT, in process: overfit, exact resume, NaN stop, frozen params, schedules."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config

from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.train.config import TrainConfig
from tinygraft.train.loop import Job, train
from tinygraft.train.methods import Full, Method
from tinygraft.train.optim import build_optimizer, lr_at, no_decay_ids, param_groups
from tinygraft.train.progress import Progress
from tinygraft.train.run_dir import RunDir


class WindowBatcher:
    """Random (x, y) windows from a token array with its own generator (a stand-in for data batchers)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.B, self.T = tokens, batch_size, seq_len
        self.rng = np.random.default_rng(seed)

    def next(self):
        ix = self.rng.integers(0, len(self.tokens) - self.T - 1, self.B)
        x = np.stack([self.tokens[i : i + self.T] for i in ix]).astype(np.int64)
        y = np.stack([self.tokens[i + 1 : i + 1 + self.T] for i in ix]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]


def make_job(cfg: TrainConfig, *, dropout=0.0, method=None, tokens=None, loss_hook=None, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    if tokens is None:
        tokens = np.random.default_rng(1).integers(0, 61, 3001).astype(np.uint16)
    val = tokens[-257:]

    def loss_fn(m, batch):
        loss = m(batch[0], batch[1])[1]
        return loss_hook(loss) if loss_hook else loss

    def evaluate(m):
        x = torch.from_numpy(val[:-1].astype(np.int64)).view(8, 32)
        y = torch.from_numpy(val[1:].astype(np.int64)).view(8, 32)
        loss = float(m(x, y)[1])
        torch.rand(3)  # evaluation touching the RNG must not change training
        return {"loss": loss, "perplexity": math.exp(loss)}

    return Job(
        model=model,
        method=method or Full(),
        batcher=WindowBatcher(tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed),
        loss_fn=loss_fn,
        evaluate=evaluate,
        count_tokens=lambda b: b[0].numel(),
        config={"train": {"steps": cfg.steps}},
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def quiet():
    return Progress(total=1, initial=0, enabled=False)


def small_cfg(**kw):
    base = dict(steps=12, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=4, log_every=2, keep=2)
    return TrainConfig(**{**base, **kw})


def test_overfits_one_repeated_sequence(tmp_path):
    pattern = np.random.default_rng(3).integers(0, 61, 17).astype(np.uint16)
    tokens = np.tile(pattern, 200)  # a period-17 sequence: perfectly predictable after one period
    cfg = small_cfg(steps=60, lr=1e-2, warmup_steps=10, eval_every=30, seq_len=32, weight_decay=0.0)
    job = make_job(cfg, tokens=tokens)
    run = RunDir(tmp_path)
    run.prepare(resume=False, overwrite=False)
    out = train(job, cfg, run, progress=quiet())
    assert out.status == "completed"
    assert out.results["metrics"]["loss"] < 0.05, out.results


def _final_weights(path):
    return checkpoint.load(path).model


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stop_and_resume_equals_straight_run(tmp_path, grad_accum):
    cfg = small_cfg(steps=12, grad_accum=grad_accum)
    straight = RunDir(tmp_path / "straight")
    straight.prepare(resume=False, overwrite=False)
    train(make_job(cfg, dropout=0.1), cfg, straight, progress=quiet())

    split = RunDir(tmp_path / "split")
    split.prepare(resume=False, overwrite=False)
    first = train(make_job(cfg, dropout=0.1), cfg, split, stop_at=6, progress=quiet())
    assert first.status == "stopped" and first.step == 6
    torch.manual_seed(999)  # the resumed process starts from other RNG states: the checkpoint must restore them
    np.random.seed(999)
    resumed = make_job(cfg, dropout=0.1, seed=5)  # other init too: weights come from the checkpoint
    second = train(resumed, cfg, split, resume=checkpoint.load(split.path), progress=quiet())
    assert second.status == "completed" and second.step == 12

    a, b = _final_weights(straight.path), _final_weights(split.path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    val_a = {r["step"]: r["loss"] for r in straight.metrics() if r["split"] == "val"}
    val_b = {r["step"]: r["loss"] for r in split.metrics() if r["split"] == "val"}
    assert set(val_b) == set(val_a) | {6}  # the stopped run also evaluated where it stopped
    for step, loss in val_a.items():
        assert val_b[step] == pytest.approx(loss, abs=1e-6)


def test_run_dir_layout_and_keep(tmp_path):
    cfg = small_cfg(steps=12, eval_every=2, keep=2)
    run = RunDir(tmp_path)
    run.prepare(resume=False, overwrite=False)
    train(make_job(cfg), cfg, run, progress=quiet())
    steps = checkpoint.list_steps(run.checkpoints)
    best = (run.checkpoints / "best").read_text().strip()
    assert (run.checkpoints / "latest").read_text().strip() == "step-00000012"
    assert set(steps) >= {10, 12} and len(steps) <= 3  # keep 2, plus the best when older
    assert best in {checkpoint.step_dir_name(s) for s in steps}
    for name in ("config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"):
        assert (run.checkpoints / "step-00000012" / name).is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    for key in (
        "task",
        "method",
        "metric",
        "metrics",
        "kept",
        "best_step",
        "train_seconds",
        "tokens_per_s",
        "trainable_params",
        "total_params",
        "optimizer_state_mb",
        "peak_memory_mb",
    ):
        assert key in results
    rows = run.metrics()
    assert {"step", "split", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed_s"} <= set(rows[0])
    assert any(r["split"] == "val" and "perplexity" in r for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert not list(run.checkpoints.glob(".tmp-*"))


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def poison(loss):
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 7 else loss

    cfg = small_cfg(steps=12, eval_every=4)
    run = RunDir(tmp_path)
    run.prepare(resume=False, overwrite=False)
    with pytest.raises(TinygraftError, match=r"nan at step 7.*step-00000004"):
        train(make_job(cfg, loss_hook=poison), cfg, run, progress=quiet())
    ckpt = checkpoint.load(run.path)
    assert ckpt.step == 4
    assert all(torch.isfinite(t).all() for t in ckpt.model.values())


class HeadOnly(Method):
    """A linear-probe-like method: only the final norm trains; unfreezes the last block at step 3."""

    name = "head-only-test"

    def param_groups(self, model):
        return [
            {"params": list(model.transformer.ln_f.parameters()), "name": "head"},
            {"params": list(model.transformer.h[-1].parameters()), "lr_scale": 0.5, "name": "top"},
        ]

    def apply_schedule(self, model, step):
        for p in model.transformer.h[-1].parameters():
            p.requires_grad_(step >= 3)


def test_frozen_params_get_no_grad_or_state_and_scheduled_unfreeze(tmp_path):
    cfg = small_cfg(steps=2, eval_every=2)
    job = make_job(cfg, method=HeadOnly())
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    run = RunDir(tmp_path)
    run.prepare(resume=False, overwrite=False)
    train(job, cfg, run, progress=quiet())
    after = job.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert all(p.grad is None for p in job.model.parameters())
    opt = checkpoint.load(run.path).optimizer
    assert len(opt["state"]) == 2  # ln_f weight and bias only
    assert {g["lr_scale"] for g in opt["param_groups"]} == {1.0, 0.5}

    cfg = small_cfg(steps=5, eval_every=5)
    job = make_job(cfg, method=HeadOnly())
    run = RunDir(tmp_path / "later")
    run.prepare(resume=False, overwrite=False)
    train(job, cfg, run, progress=quiet())
    assert len(checkpoint.load(run.path).optimizer["state"]) > 2  # the last block got state once unfrozen


def test_param_groups_no_decay_on_biases_norms_embeddings():
    model = GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32))
    skip = no_decay_ids(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for pid in skip:
        n = names[pid]
        assert n.endswith("bias") or "ln" in n or "wte" in n or "wpe" in n, n
    groups = param_groups(model, Full().param_groups(model), weight_decay=0.1)
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == model.num_params()  # the tied head appears once
    decayed = [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(n.endswith("weight") and "ln" not in n and "wte" not in n for n in decayed)


def test_schedules():
    kw = dict(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(35, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(50, schedule="constant", **kw) == 1.0
    values = [lr_at(s, schedule="cosine", **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


class BiasOnly(Method):
    """An adapter-like method: trains the biases only and checkpoints nothing else, plus a config file."""

    name = "bias-only-test"

    def param_groups(self, model):
        return [{"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "name": "bias"}]

    def state_dict(self, model):
        return {n: p.detach() for n, p in model.named_parameters() if n.endswith("bias")}

    def load_state_dict(self, model, tensors):
        model.load_state_dict(tensors, strict=False)
        return []

    def extra_files(self, model):
        return {"adapter_config.json": json.dumps({"kind": "bias"})}


def test_a_method_decides_what_the_checkpoint_stores_and_resume_still_matches(tmp_path):
    cfg = small_cfg(steps=6, eval_every=3)
    straight = RunDir(tmp_path / "a")
    straight.prepare(resume=False, overwrite=False)
    train(make_job(cfg, method=BiasOnly()), cfg, straight, progress=quiet())
    split = RunDir(tmp_path / "b")
    split.prepare(resume=False, overwrite=False)
    train(make_job(cfg, method=BiasOnly()), cfg, split, stop_at=3, progress=quiet())
    ckpt = checkpoint.load(split.path)
    assert ckpt.model and all(k.endswith("bias") for k in ckpt.model)
    assert (ckpt.path / "adapter_config.json").read_text() == '{"kind": "bias"}'
    job = make_job(cfg, method=BiasOnly())  # the frozen base comes from the job (LoRA: from the base checkpoint)
    train(job, cfg, split, resume=ckpt, progress=quiet())
    a, b = checkpoint.load(straight.path).model, checkpoint.load(split.path).model
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_fused_adamw_choice_and_its_state_resumes_under_torch_adamw(tmp_path):
    pytest.importorskip("tinygraft.kernels.adamw", reason="the fused AdamW module is not in this checkout")
    cfg = small_cfg(steps=6, eval_every=3, optimizer="fused")
    run = RunDir(tmp_path)
    run.prepare(resume=False, overwrite=False)
    train(make_job(cfg), cfg, run, stop_at=3, progress=quiet())
    ckpt = checkpoint.load(run.path)
    assert len(ckpt.optimizer["state"]) > 0
    torch_cfg = small_cfg(steps=6, eval_every=3, optimizer="torch")
    out = train(make_job(torch_cfg), torch_cfg, run, resume=ckpt, progress=quiet())
    assert out.status == "completed" and math.isfinite(out.results["metrics"]["loss"])


def test_torch_choice_is_torchs_fused_adamw_and_tracks_a_float64_adamw():
    torch.manual_seed(3)
    shapes = [(129, 7), (7,), (1,), (33, 65)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().double().clone()) for p in ours]
    groups = [{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}]
    opt = build_optimizer(groups, "torch", torch.device("cpu"), 1e-2, (0.9, 0.95), 1e-8)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(
        [{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    for _ in range(5):
        for p, r in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.double()
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach().double(), r.detach(), atol=1e-5, rtol=1e-5)
    ints = [{"params": [torch.zeros(3, dtype=torch.int64)]}]  # not fusable: torch's default path, no error
    assert not build_optimizer(ints, "torch", torch.device("cpu"), 1e-2, (0.9, 0.95), 1e-8).defaults["fused"]


def test_an_evaluation_at_stop_at_is_logged_but_never_ranked_best(tmp_path):
    """The best checkpoint of a stopped-and-resumed run is the one a straight run keeps: an evaluation made only
    because --stop-at ended the run (step 5, off the every-4 schedule) cannot win, however good its metric."""
    cfg = small_cfg(steps=8, eval_every=4)
    scores = {4: 1.0, 5: 0.1, 8: 2.0}  # a loss: step 5 would be best if it were ranked
    job = make_job(cfg)
    calls = []

    def evaluate(m):
        calls.append(len(calls))
        return {"loss": [scores[4], scores[5], scores[8]][len(calls) - 1]}

    job.evaluate, job.keep_best, job.metric, job.higher_is_better = evaluate, True, "loss", False
    run = RunDir(tmp_path)
    run.prepare(resume=False, overwrite=False)
    out = train(job, cfg, run, stop_at=5, progress=quiet())
    assert out.status == "stopped" and out.results["best_step"] == 4
    job2 = make_job(cfg)
    job2.evaluate, job2.keep_best, job2.metric, job2.higher_is_better = evaluate, True, "loss", False
    out = train(job2, cfg, run, resume=checkpoint.load(run.path), progress=quiet())
    assert out.results["best_step"] == 4 and out.results["metrics"]["loss"] == 1.0
    logged = [r["step"] for r in run.metrics() if r["split"] == "val"]
    assert logged == [4, 5, 8]


HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_with_dropout_matches_eager(tmp_path):
    """train.compile=True (inductor on the CPU) draws the very attention-dropout masks eager does (counter-based, from
    seeds drawn off torch's RNG in the same order) and lands on the same weights, to fusion rounding; the seed changing
    every step must not break the compiled code (it once made inductor emit C++ that does not build). Inductor draws
    nn.Dropout's masks with its own generator unless told to fall back to eager's, which this comparison needs."""

    out = {}
    # config.patch, not monkeypatch.setattr: setting the attribute back by hand left it hidden ("does not exist") for
    # every later compile in the process (the attention kernel's aot_eager test failed after this one)
    with inductor_config.patch(fallback_random=True):
        for compile_ in (False, True):
            cfg = small_cfg(steps=3, eval_every=3, compile=compile_)
            run = RunDir(tmp_path / str(compile_))
            run.prepare(resume=False, overwrite=False)
            train(make_job(cfg, dropout=0.1), cfg, run, progress=quiet())
            out[compile_] = checkpoint.load(run.path).model
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], atol=1e-5, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------------------- hooks the next jobs use
class L2ToZero:
    """A regulariser: lam * |theta|^2 over every trainable tensor (EWC's shape with an identity Fisher at 0)."""

    def __init__(self, lam: float):
        self.lam = lam

    def penalty(self, model):
        return self.lam * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)


class PenalisedFull(Full):
    def penalty(self, model):
        return 0.5 * model.transformer.wte.weight.pow(2).sum()


def test_loss_terms_method_penalty_and_regularisers_all_reach_the_gradient(tmp_path):
    """The loop adds the job's loss terms, the method's penalty and each regulariser's to the objective's loss:
    a run with them lands where the same run with the terms written into its loss function lands."""
    cfg = small_cfg(steps=3, eval_every=3)
    term = lambda m, b: 0.1 * m.transformer.wpe.weight.abs().sum()  # noqa: E731
    reg = L2ToZero(1e-3)
    hooked = make_job(cfg, method=PenalisedFull())
    hooked.loss_terms, hooked.regularizers = [term], [reg]
    run_a = RunDir(tmp_path / "hooked")
    run_a.prepare(resume=False, overwrite=False)
    train(hooked, cfg, run_a, progress=quiet())

    by_hand = make_job(cfg)
    model = by_hand.model
    plain_loss = by_hand.loss_fn
    by_hand.loss_fn = lambda m, b: plain_loss(m, b) + term(m, b) + PenalisedFull().penalty(model) + reg.penalty(model)
    run_b = RunDir(tmp_path / "by-hand")
    run_b.prepare(resume=False, overwrite=False)
    train(by_hand, cfg, run_b, progress=quiet())
    a, b = checkpoint.load(run_a.path).model, checkpoint.load(run_b.path).model
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    plain = make_job(cfg)
    run_c = RunDir(tmp_path / "plain")
    run_c.prepare(resume=False, overwrite=False)
    train(plain, cfg, run_c, progress=quiet())
    assert not torch.allclose(checkpoint.load(run_c.path).model["transformer.wte.weight"], a["transformer.wte.weight"])


def test_resume_refuses_an_optimizer_state_that_does_not_fit(tmp_path):
    """Optimizer state is matched by position: a run whose groups list other tensors is refused by name, not fed
    another tensor's moments."""
    cfg = small_cfg(steps=4, eval_every=2)
    run = RunDir(tmp_path / "run")
    run.prepare(resume=False, overwrite=False)
    train(make_job(cfg), cfg, run, stop_at=2, progress=quiet())

    class Reversed(Full):
        def param_groups(self, model):
            return [{"params": list(model.parameters())[::-1], "lr_scale": 1.0, "name": "all"}]

    ckpt = checkpoint.load(run.path)
    with pytest.raises(TinygraftError, match="does not fit this run's parameters|moment where this run's parameter"):
        train(make_job(cfg, method=Reversed()), cfg, run, resume=ckpt, progress=quiet())
