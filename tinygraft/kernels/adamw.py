"""FusedAdamW: AdamW with one Triton launch per step for every (device, dtype) group of tensors.

For each tensor that has a gradient, with t its own step count (incremented first, as torch.optim.AdamW does):

    g = -grad if maximize else grad;   g = g * c                 c = min(1, max_norm / (||all grads||_2 + 1e-6))
    theta = theta * (1 - lr wd)                                   decoupled weight decay (Loshchilov & Hutter, 2019)
    m = m + (1 - beta1) (g - m)                                   = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    theta = theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)        (Kingma & Ba, 2015)

The clip factor c applies only with `max_grad_norm` (torch.nn.utils.clip_grad_norm_'s formula, without rewriting
the .grad tensors); the norm lands in `last_grad_norm`, and max_grad_norm=inf measures it without clipping.

Each element is read once and written once: param, grad, exp_avg, exp_avg_sq = 28 bytes per fp32 parameter.
With `master_weights=True`, bf16/fp16 parameters get fp32 master weights and fp32 moments in their state: the kernel
updates the master copy and writes the rounded value into the model's param (also 28 bytes per parameter).

State and state_dict match torch.optim.AdamW's (`step`, `exp_avg`, `exp_avg_sq` per param; its group keys), so
either loads the other's; master mode adds `master_param` (kept fp32 through load_state_dict). Checkpoints store
it through tinygraft.core.checkpoint (tensors to safetensors, the rest to JSON) like any optimizer's.

Dispatch: the Triton kernels of adamw_triton.py when the params are on CUDA (or TINYGRAFT_BACKEND=triton under
the interpreter), else `_reference_update`, torch's own AdamW math written out per tensor.
"""

import math

import torch

from tinygraft.errors import TinygraftError
from tinygraft.kernels.backend import backend_for

_LOW = (torch.float16, torch.bfloat16)
# torch.optim.AdamW's group keys with the values that describe this algorithm, so a state dict saved here loads there
_TORCH_KEYS = {
    "amsgrad": False,
    "foreach": None,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}


def _value(x) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW over any params; torch.optim.AdamW's arguments plus master weights and a fused grad-norm clip.

    lr and betas may be tensors (read on their device each step). `capturable=True` keeps the step counts on the
    params' device, as torch's capturable/fused AdamW does.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        *,
        maximize=False,
        master_weights=False,
        max_grad_norm=None,
        capturable=False,
    ):
        if _value(lr) < 0 or eps < 0 or weight_decay < 0:
            raise TinygraftError(f"FusedAdamW needs lr, eps, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= _value(b) < 1.0 for b in betas):
            raise TinygraftError(f"FusedAdamW betas must lie in [0, 1); got {tuple(betas)}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise TinygraftError(f"FusedAdamW max_grad_norm must be > 0 (or None for no clipping); got {max_grad_norm}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            master_weights=master_weights,
            capturable=capturable,
            **_TORCH_KEYS,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim.AdamW state dict lacks our keys
            ours = {"maximize": False, "master_weights": False, "capturable": False}
            for key, value in {**ours, **_TORCH_KEYS}.items():
                group.setdefault(key, value)
            group["betas"] = tuple(group["betas"])

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch's loader casts every floating state tensor to its param's dtype; fp32 master weights and moments of
        # bf16/fp16 params must stay fp32
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            if group["amsgrad"]:
                raise TinygraftError("optimizer state uses amsgrad, which FusedAdamW does not implement")
            if not group["decoupled_weight_decay"]:
                raise TinygraftError("optimizer state comes from Adam with L2 weight decay, not AdamW")
            for p, pid in zip(group["params"], saved["params"]):
                if p.dtype not in _LOW:
                    continue
                for key, value in state_dict["state"].get(pid, {}).items():
                    if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32:
                        self.state[p][key] = value.to(p.device, copy=True)

    # ---- step ----

    def _init_state(self, p: torch.Tensor, group: dict, master: bool) -> dict:
        state = self.state[p]
        if not state:
            device = p.device if group["capturable"] else "cpu"
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
            dtype = torch.float32 if master else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if master:  # also upgrades a state loaded from torch.optim.AdamW (bf16 moments, no master copy)
            if "master_param" not in state:
                state["master_param"] = p.detach().float()
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].float()
        return state

    def _gather(self) -> dict:
        """{(device, param dtype, state dtype, master): [(param, group, state)]} over params that have grads."""
        launches, steps = {}, []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise TinygraftError("FusedAdamW supports dense real-valued params and grads only")
                master = group["master_weights"] and p.dtype in _LOW
                state = self._init_state(p, group, master)
                steps.append(state["step"])
                key = (p.device, p.dtype, state["exp_avg"].dtype, master)
                launches.setdefault(key, []).append((p, group, state))
        if steps:
            torch._foreach_add_(steps, 1.0)
        return launches

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        launches = self._gather()
        if not launches:
            return loss
        params = [p for items in launches.values() for p, _, _ in items]
        if backend_for(*params) == "triton":
            self._step_triton(launches)
        else:
            self._step_reference(launches)
        return loss

    def _step_triton(self, launches: dict) -> None:
        from tinygraft.kernels import adamw_triton

        plans, fallback = [], {}
        for (device, p_dtype, s_dtype, master), items in launches.items():
            flat = [it for it in items if _dense(it[0], it[2])]
            fallback.update({id(it[0]): it for it in items if not _dense(it[0], it[2])})
            if not flat:
                continue
            rows = [
                (p, p.grad.to(p.dtype).contiguous(), st["exp_avg"], st["exp_avg_sq"], st.get("master_param"))
                for p, _, st in flat
            ]
            hyper = _hyper_table(flat, torch.float64 if p_dtype == torch.float64 else torch.float32)
            plans.append((adamw_triton.Group(rows, hyper, device), p_dtype, s_dtype, master, rows))
        coef = None
        if self.max_grad_norm is not None:
            sq = [adamw_triton.grad_sq_norm(plan[0], plan[1]) for plan in plans]
            dev = plans[0][0].device if plans else next(iter(fallback.values()))[0].device
            sq += [it[0].grad.float().square().sum().to(dev) for it in fallback.values()]
            coef = self._clip_coef(torch.stack([s.to(dev) for s in sq]).sum().sqrt())
        for group, p_dtype, s_dtype, master, _rows in plans:
            adamw_triton.launch_update(group, p_dtype, s_dtype, master, None if coef is None else coef.to(group.device))
        for p, group, state in fallback.values():  # non-contiguous params (rare): the reference, one by one
            _reference_update(p, group, state, coef)

    def _step_reference(self, launches: dict) -> None:
        items = [it for its in launches.values() for it in its]
        coef = None
        if self.max_grad_norm is not None:
            norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p, _, _ in items]
            coef = self._clip_coef(torch.linalg.vector_norm(torch.stack(norms)))
        for p, group, state in items:
            _reference_update(p, group, state, coef)

    def _clip_coef(self, total_norm: torch.Tensor) -> torch.Tensor:
        """clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)), a 0-d fp32 tensor (no host sync)."""
        self.last_grad_norm = total_norm
        return torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0).float().reshape(1)


def _dense(p: torch.Tensor, state: dict) -> bool:
    tensors = [p, state["exp_avg"], state["exp_avg_sq"]] + ([state["master_param"]] if "master_param" in state else [])
    return all(t.is_contiguous() for t in tensors)


def _hyper_table(items: list, dtype: torch.dtype) -> torch.Tensor:
    """(K, 9) per-tensor scalars in adamw_triton.HYPER order, computed in float64 (as torch's Python floats are)."""
    tensor_values = [v for _, g, _ in items for v in (g["lr"], *g["betas"]) if torch.is_tensor(v)]
    device = next((v.device for v in tensor_values if v.device.type != "cpu"), torch.device("cpu"))

    def col(get):
        values = [get(g) for _, g, _ in items]
        if any(torch.is_tensor(v) for v in values):
            return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        return torch.tensor(values, dtype=torch.float64, device=device)

    step = torch.stack([st["step"] for _, _, st in items]).to(device, torch.float64)
    lr, wd, eps = col(lambda g: g["lr"]), col(lambda g: g["weight_decay"]), col(lambda g: g["eps"])
    beta1, beta2 = col(lambda g: g["betas"][0]), col(lambda g: g["betas"][1])
    sign = col(lambda g: -1.0 if g["maximize"] else 1.0)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    cols = [1 - lr * wd, beta1, 1 - beta1, beta2, 1 - beta2, lr / bc1, bc2.sqrt(), eps, sign]
    return torch.stack(cols, dim=1).to(dtype)


# ---- reference: torch.optim.AdamW's single-tensor math, plus master weights and the clip factor ----


def _reference_update(p: torch.Tensor, group: dict, state: dict, clip_coef: torch.Tensor | None) -> None:
    lr, wd, eps = _value(group["lr"]), group["weight_decay"], group["eps"]
    beta1, beta2 = (_value(b) for b in group["betas"])
    step = _value(state["step"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    theta = state.get("master_param", p)
    g = -p.grad if group["maximize"] else p.grad
    if clip_coef is not None:
        g = g * clip_coef.to(g.device)
    g = g.to(m.dtype)
    theta.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    theta.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    if theta is not p:
        p.copy_(theta)
