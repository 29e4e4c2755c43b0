"""Activation checkpointing (`--set train.activation_checkpointing=true`) per method: memory held for backward, peak
memory and training-step time, with and without, on a GPT.

    python -m bench.activation_checkpointing            # GPU: GPT-2 124M shape, B 8 x T 1024, bf16 autocast
    python -m bench.activation_checkpointing --quick    # small shapes (the default on a CPU): 4 layers, 128 wide,
                                                        # vocab 2048, B 4 x T 256, fp32

One step = forward, causal-LM loss, backward, AdamW step over the trainable tensors, zero grads; training mode,
dropout 0.1 on the LoRA/DoRA input. Methods: full fine-tuning and every adapter method (peft/api.py: add_adapter).

Columns:
- `saved_mb`: the bytes kept for backward when the forward ends (deterministic, and meaningful on a CPU): every
  distinct storage that autograd saved (`torch.autograd.graph.saved_tensors_hooks`) plus, when checkpointing, the
  inputs each checkpointed block keeps to recompute from; parameters' own storages are not counted (they are there
  either way). The recomputation in backward adds one block's activations at a time on top of this.
- `peak_mb`: what one step adds at its peak, activations, gradients and optimizer temporaries together. CUDA: max
  allocated (bench/common.py: peak_memory_mb). CPU: the peak of torch.profiler's memory timeline (the bytes of the
  tensors the step allocated, at their most), since the resident set hides a step's tensors in allocator reuse;
  where that profiler API is missing, the resident-set figure (notes["cpu_peak"] says which).
- `ms`: median step time; checkpointing recomputes each block's forward in backward (about 1/3 more compute).
- `grad_diff`: the largest |grad with - grad without| over the trainable tensors, one step from the same RNG state
  (0 where recomputation is exact, as in float32 on a CPU).
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from bench.common import Results, bench_device, peak_memory_mb, time_fn
from tinygraft.core.layers import set_activation_checkpointing
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.peft.api import add_adapter

R, ALPHA, DROPOUT = 8, 16, 0.1
TARGETS = ["c_attn", "c_proj", "c_fc"]
METHODS = {
    "full": None,
    "lora": dict(targets=TARGETS, r=R, alpha=ALPHA, dropout=DROPOUT),
    "dora": dict(targets=TARGETS, r=R, alpha=ALPHA, dropout=DROPOUT),
    "ia3": {},
    "houlsby": {},
    "pfeiffer": {},
    "prompt-tuning": dict(num_virtual_tokens=20),
    "prefix-tuning": dict(num_virtual_tokens=20),
}


def with_method(base: GPT, method: str) -> GPT:
    model = copy.deepcopy(base)
    if METHODS[method] is not None:
        add_adapter(model, method, **METHODS[method])  # freezes the rest
    return model


def step_fn(model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_of(x, y):
        with amp:
            logits = model(x)[0]
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def step(x, y):
        loss_of(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, loss_of, params


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def saved_mb(model, loss_of, x, y) -> float:
    """MB of distinct storages kept for backward at the end of the forward (see the module docstring)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in own and s.nbytes():
            kept[s.data_ptr()] = s.nbytes()

    def pack(t):
        keep(t)
        return t

    def block_inputs(block, args):
        if model.activation_checkpointing:  # non-reentrant checkpointing keeps its inputs to recompute from
            for t in _tensors(args):
                keep(t)

    hooks = [b.register_forward_pre_hook(block_inputs) for b in model.transformer.h]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(x, y)
    for h in hooks:
        h.remove()
    total = sum(kept.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total / 2**20


def step_peak_mb(fn, device) -> tuple[float, str]:
    """(MB one call of fn adds at its peak, how it was measured): see `peak_mb` in the module docstring."""
    if device.type == "cuda":
        return peak_memory_mb(fn, device), "cuda max allocated"
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline  # noqa: PLC0415 (private, may go)

        cpu = torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[cpu], profile_memory=True, record_shapes=True, with_stack=True) as p:
            fn()
        _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(device)
        return max(sum(s) for s in sizes) / 2**20, "torch.profiler memory timeline"
    except (ImportError, AttributeError, TypeError, ValueError):
        return peak_memory_mb(fn, device), "peak resident set"


def grads_of(loss_of, params, x, y, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    loss_of(x, y).backward()
    out = [p.grad.detach().float().clone() if p.grad is not None else torch.zeros(()) for p in params]
    for p in params:
        p.grad = None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--batch", type=int, help="sequences per step (GPU 8, CPU 4)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (GPU 1024, CPU 256; more than 20)")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per row (0.3 s GPU, 2 s CPU)")
    args = parser.parse_args(argv)
    device = bench_device()
    quick = args.quick or device.type != "cuda"
    cfg = GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128) if quick else GPTConfig()
    B, T = args.batch or (4 if quick else 8), args.seq or (256 if quick else 1024)
    if not 20 < T <= cfg.block_size:
        parser.error(f"--seq must be in (20, {cfg.block_size}]: prompt tuning gives 20 of the positions to its prompt")
    budget = args.budget_s or (0.3 if device.type == "cuda" else 2.0)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    torch.manual_seed(0)
    base = GPT(cfg).to(device).train()
    g = torch.Generator().manual_seed(1)
    inputs = [
        tuple(torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2)) for _ in range(2)
    ]
    notes = {"B": B, "T": T, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size, "r": R,
             "dropout": DROPOUT, "amp": "bf16" if device.type == "cuda" else "fp32",
             "cpu_threads": torch.get_num_threads()}  # fmt: skip
    res = Results("activation_checkpointing", device, notes=notes)
    n_base = sum(p.numel() for p in base.parameters())
    for method in methods:
        model = with_method(base, method)
        step, loss_of, params = step_fn(model, device)
        ins = [(x[:, : T - 20], y[:, : T - 20]) for x, y in inputs] if method == "prompt-tuning" else inputs
        x, y = ins[0]
        grads = []
        for on in (False, True):  # before any optimizer step changes the weights
            set_activation_checkpointing(model, on)
            grads.append(grads_of(loss_of, params, x, y))
        diff = max(float((a - b).abs().max()) for a, b in zip(*grads))
        for on in (False, True):
            set_activation_checkpointing(model, on)
            t = time_fn(step, inputs=ins, device=device, warmup=2, budget_s=budget)
            peak, how = step_peak_mb(lambda step=step, x=x, y=y: step(x, y), device)
            res.data["notes"]["cpu_peak" if device.type != "cuda" else "peak"] = how
            trainable = sum(p.numel() for p in params)
            res.add(method=method, checkpointing="on" if on else "off", trainable=trainable,
                    trainable_pct=100 * trainable / n_base, saved_mb=saved_mb(model, loss_of, x, y), peak_mb=peak,
                    ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, tokens_per_s=B * x.shape[1] / t.median_ms * 1e3,
                    grad_diff=diff if on else None)  # fmt: skip
        del model, step, loss_of, params
    res.table(["method", "checkpointing", "trainable", "saved_mb", "peak_mb", "ms", "p20_ms", "p80_ms", "grad_diff"])
    by = {(r["method"], r["checkpointing"]): r for r in res.rows}
    ratios = {}
    for method in methods:
        off, on = by[method, "off"], by[method, "on"]
        ratios[method] = {"saved": on["saved_mb"] / off["saved_mb"], "peak": on["peak_mb"] / max(off["peak_mb"], 1e-9),
                          "time": on["ms"] / off["ms"]}  # fmt: skip
        print(f"{method}: held for backward {off['saved_mb']:.1f} -> {on['saved_mb']:.1f} MB "
              f"({ratios[method]['saved']:.2f}x), peak {off['peak_mb']:.1f} -> {on['peak_mb']:.1f} MB, step "
              f"{ratios[method]['time']:.2f}x the time")  # fmt: skip
    res.data["notes"]["on_over_off"] = ratios
    path = res.save()
    png = res.plot(x="method", y="saved_mb", series="checkpointing", ylabel="MB kept for backward")
    print("wrote", path, png)


if __name__ == "__main__":
    main()
