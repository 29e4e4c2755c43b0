"""Fused LoRA linear vs unfused eager vs peft's layer vs the frozen base matmul alone (the floor).

    python -m bench.lora            # GPU: bf16, layers 4096x4096 and 4096x11008, tokens 2k-16k, r 8/16/64
    python -m bench.lora --quick    # a few small shapes (what runs on a CPU, against the reference path)

Each case times the forward and the forward+backward (x requires grad as inside a network; W frozen; A and B
trainable), reports ms, TFLOP/s and peak memory, and checks the fused output against eager. FLOPs count each
implementation's own math: the base 2*M*N*K forward, 4*M*N*K forward+backward; LoRA adds 2*M*r*(K+N) forward
and 6*M*r*(K+N) forward+backward. Goals (H100): fused forward+backward <= 1.10x the base
alone, >= 1.25x faster than eager, peak memory <= eager.
"""

import argparse

import torch
import torch.nn.functional as F

from bench.common import Results, bench_device, peak_memory_mb, time_fn
from tinygraft.kernels.backend import backend_for
from tinygraft.kernels.lora import lora_linear

GPU_LAYERS = [(4096, 4096), (4096, 11008)]  # (in, out)
GPU_TOKENS = [2048, 4096, 8192, 16384]
CPU_LAYERS = [(256, 688)]
CPU_TOKENS = [128, 512]
RANKS = [8, 16, 64]
CPU_RANKS = [8, 64]
ALPHA = 16.0


def peft_layer(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: int):
    """peft's own LoRA Linear around an nn.Linear holding w, with our A and B (None when peft is absent)."""
    try:
        import peft  # noqa: PLC0415 (the reference, imported only where it is compared)
    except ImportError:
        return None
    base = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype))
    base[0].weight.data = w
    # get_peft_model on a one-layer model: peft's public way to build its layer, stable across its versions
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["0"]))
    layer = model.base_model.model[0]
    layer.lora_A["default"].weight.data = a.detach().clone()
    layer.lora_B["default"].weight.data = b.detach().clone()
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def implementations(w, a, b, r):
    """name -> (forward fn of x, trainable tensors whose gradients the backward computes besides x)."""
    s = ALPHA / r
    impls = {
        "base": (lambda x: F.linear(x, w), []),
        "eager": (lambda x: x @ w.t() + s * (x @ a.t()) @ b.t(), [a, b]),
        "tinygraft": (lambda x: lora_linear(x, w, None, a, b, s), [a, b]),
    }
    theirs = peft_layer(w, a, b, r)
    if theirs is not None:
        impls["peft"] = theirs
    return impls


def flops(tokens, k, n, r, with_backward, lora):
    base = (4 if with_backward else 2) * tokens * n * k
    return base + ((6 if with_backward else 2) * tokens * r * (k + n) if lora else 0)


def run_case(res, dev, dtype, tokens, k, n, r, budget_s):
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    a = (torch.randn(r, k, device=dev, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dtype) / r**0.5).requires_grad_()
    xs = [torch.randn(tokens, k, device=dev, dtype=dtype).requires_grad_() for _ in range(2)]
    grad = torch.randn(tokens, n, device=dev, dtype=dtype)
    impls = implementations(w, a, b, r)
    with torch.no_grad():
        fused, eager = impls["tinygraft"][0](xs[0]), impls["eager"][0](xs[0])
        max_err = (fused.float() - eager.float()).abs().max().item()
    case = f"{k}x{n} r{r} T{tokens}"
    for name, (fn, params) in impls.items():

        def forward(x, fn=fn):
            with torch.no_grad():
                return fn(x)

        def forward_backward(x, fn=fn, params=params):
            return torch.autograd.grad(fn(x), [x, *params], grad)

        for label, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
            t = time_fn(step, inputs=[(x,) for x in xs], device=dev, budget_s=budget_s)
            mem = peak_memory_mb(lambda step=step: step(xs[0]), device=dev)
            f = flops(tokens, k, n, r, label == "fwd+bwd", name != "base")
            res.add(
                case=case,
                pass_=label,
                impl=name,
                tokens=tokens,
                in_f=k,
                out_f=n,
                r=r,
                ms=t.median_ms,
                p20_ms=t.p20_ms,
                p80_ms=t.p80_ms,
                tflops=f / t.median_ms / 1e9,
                peak_mb=mem,
                max_err_vs_eager=max_err if name == "tinygraft" else None,
            )


def goal_lines(rows) -> list[str]:
    """Per case: fused fwd+bwd over the base alone, eager over fused, and fused vs eager peak memory."""
    by = {(r["case"], r["pass_"], r["impl"]): r for r in rows}
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        fused, base, eager = (by.get((case, "fwd+bwd", i)) for i in ("tinygraft", "base", "eager"))
        if fused and base and eager:
            lines.append(
                f"{case}: fused/base {fused['ms'] / base['ms']:.2f}x (goal <= 1.10), eager/fused "
                f"{eager['ms'] / fused['ms']:.2f}x (goal >= 1.25), peak MB fused {fused['peak_mb']:.0f} vs "
                f"eager {eager['peak_mb']:.0f} (goal <=)"
            )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="bfloat16 on a GPU, float32 on a CPU by default",
    )
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per case (1 s GPU, 0.3 s CPU)")
    args = parser.parse_args(argv)
    dev = bench_device()
    budget_s = args.budget_s or (1.0 if dev.type == "cuda" else 0.3)
    quick = args.quick or dev.type != "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    layers, tokens_list, ranks = (CPU_LAYERS, CPU_TOKENS, CPU_RANKS) if quick else (GPU_LAYERS, GPU_TOKENS, RANKS)
    probe = torch.empty(1, device=dev)
    res = Results(
        "lora",
        dev,
        notes={
            "dtype": str(dtype).removeprefix("torch."),
            "alpha": ALPHA,
            "dropout": 0.0,
            "tinygraft_path": backend_for(probe),
        },
    )
    torch.manual_seed(0)
    for k, n in layers:
        for r in ranks:
            for tokens in tokens_list:
                run_case(res, dev, dtype, tokens, k, n, r, budget_s)
    res.table(["case", "pass_", "impl", "ms", "tflops", "peak_mb", "max_err_vs_eager"])
    if res.data["notes"]["tinygraft_path"] == "triton":
        res.data["notes"]["goals"] = goal_lines(res.rows)
    else:
        res.data["notes"]["goals"] = [
            "not measured: 'tinygraft' ran the PyTorch reference here (the same math as "
            "eager), so only a GPU run with the Triton kernels speaks to the goals"
        ]
    print("\n".join(res.data["notes"]["goals"]))
    print("saved", res.save())
    rows = list(res.rows)
    res.rows[:] = [r for r in rows if r["pass_"] == "fwd+bwd"]  # the plot shows forward+backward only
    print("plot", res.plot(x="case", y="ms", series="impl", ylabel="ms, forward+backward (lower is better)"))
    res.rows[:] = rows


if __name__ == "__main__":
    main()
