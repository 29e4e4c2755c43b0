"""FusedAdamW against torch.optim.AdamW, on both backends (Triton under the interpreter on CPU; compiled on a GPU).

torch.optim.AdamW is the live reference: same params, same grads, compared after every run. Tolerances are the
issue's: 1e-6 relative (max abs difference over max abs value, per tensor) for fp32, 1e-2 for bf16 master weights.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygraft.core.checkpoint import optimizer_from_files, optimizer_to_files
from tinygraft.errors import TinygraftError
from tinygraft.kernels import adamw as adamw_mod
from tinygraft.kernels.adamw import FusedAdamW

BACKENDS = ["triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("TINYGRAFT_BACKEND", request.param)
    return request.param


class TinyNet(torch.nn.Module):
    """A small model with awkward sizes: 1-element and 7-element tensors, one of 2,145 (two full blocks and a tail
    under the interpreter), and a parameter the forward never uses (its grad stays None)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(37, 13)
        self.fc1 = torch.nn.Linear(13, 165)
        self.norm = torch.nn.LayerNorm(165)
        self.fc2 = torch.nn.Linear(165, 7)
        self.scale = torch.nn.Parameter(torch.randn(1))
        self.unused = torch.nn.Parameter(torch.randn(5))

    def forward(self, idx):
        h = torch.nn.functional.gelu(self.fc1(self.emb(idx)))
        return self.fc2(self.norm(h)) * self.scale


def _groups(model, lr_a=1e-2):
    """Three param groups: different lr/betas/wd, weight decay off in one, maximize in one."""
    return [
        {"params": [model.emb.weight, model.fc1.weight], "lr": lr_a, "betas": (0.8, 0.99), "weight_decay": 0.1},
        {"params": [model.fc1.bias, model.norm.weight, model.scale], "weight_decay": 0.0, "maximize": True},
        {"params": [model.norm.bias, model.fc2.weight, model.fc2.bias, model.unused]},
    ]


def _batch(step, device):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 37, (4, 9), generator=g).to(device), torch.randint(0, 7, (4, 9), generator=g).to(device)


def _loss(model, step, device):
    idx, y = _batch(step, device)
    return torch.nn.functional.cross_entropy(model(idx).flatten(0, 1).float(), y.flatten())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _train_pair(ours, theirs, model_a, model_b, steps, device, start=0, clip=None):
    """Grads from model_b's backward, copied into model_a, so both optimizers see identical grads every step.
    fc1.bias skips its grad on odd steps (its step count then lags the others')."""
    for step in range(start, start + steps):
        theirs.zero_grad()
        ours.zero_grad()
        _loss(model_b, step, device).backward()
        if step % 2:
            model_b.fc1.bias.grad = None
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            pa.grad = None if pb.grad is None else pb.grad.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model_b.parameters(), clip)
        ours.step()
        theirs.step()


def _assert_state_matches(ours, theirs, model_a, model_b, tol):
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert _rel(pa, pb) <= tol, f"{name}: relative difference {_rel(pa, pb):.3g}"
        sa, sb = ours.state.get(pa, {}), theirs.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        for key in sb:
            if key == "step":
                assert sa[key].item() == sb[key].item(), f"{name} step"
            else:
                assert _rel(sa[key], sb[key]) <= tol, f"{name} {key}: {_rel(sa[key], sb[key]):.3g}"


def _pair(device, **kw):
    model_b = TinyNet().to(device)
    model_a = TinyNet().to(device)
    model_a.load_state_dict(model_b.state_dict())
    return model_a, model_b, FusedAdamW(_groups(model_a), lr=3e-3, **kw), torch.optim.AdamW(_groups(model_b), lr=3e-3)


def test_20_steps_match_torch_adamw(backend, device):
    model_a, model_b, ours, theirs = _pair(device)
    _train_pair(ours, theirs, model_a, model_b, 20, device)
    assert "step" not in ours.state.get(model_a.unused, {})  # never had a grad: no state, as in torch
    assert ours.state[model_a.fc1.bias]["step"].item() == 10  # skipped on odd steps
    _assert_state_matches(ours, theirs, model_a, model_b, 1e-6)


@pytest.mark.kernel_smoke
def test_smoke_two_steps(device, monkeypatch):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")
    model_a, model_b, ours, theirs = _pair(device)
    _train_pair(ours, theirs, model_a, model_b, 2, device)
    _assert_state_matches(ours, theirs, model_a, model_b, 1e-6)


def test_lr_and_betas_as_tensors(backend, device):
    """Tensor hyperparameters give the float run (torch, given the same fp32-rounded values as floats; its own
    tensor-beta path computes the bias corrections in fp32, 1e-5 off)."""
    lr_a, lr, beta1, beta2 = torch.tensor(1e-2), torch.tensor(3e-3), torch.tensor(0.9), torch.tensor(0.999)
    model_a, model_b, _, _ = _pair(device)
    groups = _groups(model_a, lr_a=lr_a)
    groups[2]["betas"] = (beta1, beta2)
    ours = FusedAdamW(groups, lr=lr)
    groups = _groups(model_b, lr_a=lr_a.item())
    groups[2]["betas"] = (beta1.item(), beta2.item())
    theirs = torch.optim.AdamW(groups, lr=lr.item())
    _train_pair(ours, theirs, model_a, model_b, 5, device)
    _assert_state_matches(ours, theirs, model_a, model_b, 1e-6)


class _CountLaunches:
    """Wraps a @triton.jit kernel: counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.count += 1
            return launch(*args, **kwargs)

        return counted


@pytest.mark.parametrize("master_weights,clip", [(False, None), (True, 1.0)])
def test_one_launch_per_device_dtype_group(device, monkeypatch, master_weights, clip):
    """fp32, bf16 and fp16 params spread over two param groups (some grads None): three launches per step,
    plus three norm launches when clipping."""
    from tinygraft.kernels import adamw_triton  # noqa: PLC0415 (it imports Triton)

    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")
    update = _CountLaunches(adamw_triton._adamw_kernel)
    norm = _CountLaunches(adamw_triton._sq_norm_kernel)
    monkeypatch.setattr(adamw_triton, "_adamw_kernel", update)
    monkeypatch.setattr(adamw_triton, "_sq_norm_kernel", norm)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    params = [torch.nn.Parameter(torch.randn(7 + 60 * i, device=device).to(dt)) for i, dt in enumerate(dtypes)]
    opt = FusedAdamW(
        [{"params": params[:4]}, {"params": params[4:], "lr": 1e-2}], master_weights=master_weights, max_grad_norm=clip
    )
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = None if i == 6 or (i == 3 and step == 1) else torch.randn_like(p)
        update.count = norm.count = 0
        opt.step()
        assert update.count == 3, f"step {step}: {update.count} update launches for 3 (device, dtype) groups"
        assert norm.count == (3 if clip else 0)


def test_bf16_master_weights_track_fp32(backend, device):
    """50 steps of a bf16 model with fp32 master weights: its masters stay as close to an fp32 run as PyTorch's own
    recipe does (torch's AdamW stepping fp32 copies with the bf16 model's gradients, the model then set to the
    rounded copies), by the kernels' rule: at most twice PyTorch's distance, floored at one bf16 rounding. Both
    drift from the fp32 run by about 1%: the bf16 forward and backward round every gradient."""
    model32 = TinyNet().to(device)
    model16, model_ref = TinyNet().to(device), TinyNet().to(device)
    for m in (model16, model_ref):
        m.load_state_dict(model32.state_dict())
        m.to(torch.bfloat16)
    masters = [p.detach().float().clone() for p in model_ref.parameters()]
    opt32 = torch.optim.AdamW(model32.parameters(), lr=1e-3)
    opt16 = FusedAdamW(model16.parameters(), lr=1e-3, master_weights=True)
    opt_ref = torch.optim.AdamW(masters, lr=1e-3)
    for step in range(50):
        for model, opt in ((model32, opt32), (model16, opt16), (model_ref, None)):
            model.zero_grad(set_to_none=True)
            _loss(model, step, device).backward()
            if opt is not None:
                opt.step()
        for m, p in zip(masters, model_ref.parameters()):
            m.grad = None if p.grad is None else p.grad.float()
        opt_ref.step()
        with torch.no_grad():
            for m, p in zip(masters, model_ref.parameters()):
                p.copy_(m.bfloat16())
    floor = torch.finfo(torch.bfloat16).eps / 2  # one rounding to bf16 (round to nearest)
    for (name, p32), p16, ref in zip(model32.named_parameters(), model16.parameters(), masters):
        if name == "unused":
            continue
        state = opt16.state[p16]
        assert p16.dtype == torch.bfloat16 and state["master_param"].dtype == torch.float32
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(p16, state["master_param"].bfloat16())  # the model holds the rounded master
        ours = ((state["master_param"] - p32).norm() / p32.norm()).item()
        torch_ = ((ref - p32).norm() / p32.norm()).item()
        assert ours <= 2 * max(torch_, floor), (
            f"{name}: master weights {ours:.3g} from the fp32 run, torch's {torch_:.3g}"
        )


@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clips / does not clip
def test_clip_equals_clip_grad_norm(backend, device, max_norm):
    model_a, model_b, ours, theirs = _pair(device, max_grad_norm=max_norm)
    _train_pair(ours, theirs, model_a, model_b, 6, device, clip=max_norm)
    _assert_state_matches(ours, theirs, model_a, model_b, 1e-6)
    theirs.zero_grad()
    _loss(model_b, 99, device).backward()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        pa.grad = None if pb.grad is None else pb.grad.clone()
    expect = torch.nn.utils.clip_grad_norm_(model_b.parameters(), max_norm)
    ours.step()
    assert abs(ours.last_grad_norm.item() - expect.item()) <= 1e-6 * expect.item()


def test_state_dict_round_trips_with_torch_both_ways(backend, device):
    # ours -> torch: 5 steps in FusedAdamW, continue 5 in a torch.optim.AdamW loaded from its state dict
    model_a, model_b, ours, theirs = _pair(device)
    _train_pair(ours, theirs, model_a, model_b, 5, device)
    model_b.load_state_dict(model_a.state_dict())
    theirs = torch.optim.AdamW(_groups(model_b), lr=3e-3)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # load_state_dict may alias same-dtype tensors
    _train_pair(ours, theirs, model_a, model_b, 5, device, start=5)
    _assert_state_matches(ours, theirs, model_a, model_b, 1e-6)
    # torch -> ours: continue 5 more in a fresh FusedAdamW loaded from torch's state dict
    model_a.load_state_dict(model_b.state_dict())
    ours = FusedAdamW(_groups(model_a), lr=1.0)  # lr and the rest come from the state dict
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[1]["maximize"]
    _train_pair(ours, theirs, model_a, model_b, 5, device, start=10)
    _assert_state_matches(ours, theirs, model_a, model_b, 1e-6)


def _save_checkpoint(path, model, opt):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    tensors, meta = optimizer_to_files(opt.state_dict())  # the trainer's checkpoint format
    save_file(tensors, path / "optimizer.safetensors")
    (path / "optimizer.json").write_text(json.dumps(meta))


def _load_checkpoint(path, model, opt, device):
    model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    meta = json.loads((path / "optimizer.json").read_text())
    opt.load_state_dict(optimizer_from_files(load_file(path / "optimizer.safetensors"), meta))


def test_resume_from_safetensors_checkpoint_continues_identically(backend, device, tmp_path):
    """bf16 params with master weights beside fp32 ones, clipping on: a resumed run gives bit-identical weights."""

    def make():
        model = TinyNet().to(device)
        model.fc2.to(torch.bfloat16)
        model.fc2.register_forward_pre_hook(lambda m, args: (args[0].bfloat16(),))
        return model, FusedAdamW(_groups(model), lr=3e-3, master_weights=True, max_grad_norm=0.5)

    def run(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            _loss(model, step, device).backward()
            opt.step()

    model, opt = make()
    run(model, opt, range(4))
    _save_checkpoint(tmp_path, model, opt)
    run(model, opt, range(4, 8))

    model2, opt2 = make()
    _load_checkpoint(tmp_path, model2, opt2, device)
    assert opt2.state[model2.fc2.weight]["master_param"].dtype == torch.float32  # not rounded by the loader
    run(model2, opt2, range(4, 8))
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
        for key, value in opt.state.get(p, {}).items():
            assert torch.equal(value, opt2.state[p2][key]), f"{name} {key}"


def test_bad_arguments_and_states_are_one_sentence():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TinygraftError, match="betas"):
        FusedAdamW(params, betas=(0.9, 1.0))
    with pytest.raises(TinygraftError, match="lr"):
        FusedAdamW(params, lr=-1.0)
    with pytest.raises(TinygraftError, match="max_grad_norm"):
        FusedAdamW(params, max_grad_norm=0.0)
    amsgrad = torch.optim.AdamW(params, amsgrad=True).state_dict()
    with pytest.raises(TinygraftError, match="amsgrad"):
        FusedAdamW(params).load_state_dict(amsgrad)
    adam = torch.optim.Adam(params, weight_decay=0.1).state_dict()
    with pytest.raises(TinygraftError, match="L2 weight decay"):
        FusedAdamW(params).load_state_dict(adam)
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(TinygraftError, match="dense"):
        FusedAdamW(emb.parameters()).step()


def test_reference_runs_on_cpu_by_default(monkeypatch):
    """Without TINYGRAFT_BACKEND, CPU params take the reference path: bit-identical to torch's single-tensor AdamW."""
    monkeypatch.delenv("TINYGRAFT_BACKEND", raising=False)
    calls = []
    real = adamw_mod._reference_update
    monkeypatch.setattr(adamw_mod, "_reference_update", lambda *a: calls.append(1) or real(*a))
    model_a, model_b, ours, theirs = _pair(torch.device("cpu"))
    _train_pair(ours, theirs, model_a, model_b, 3, torch.device("cpu"))
    assert calls
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
