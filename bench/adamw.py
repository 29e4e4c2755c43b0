"""AdamW step: FusedAdamW vs torch.optim.AdamW (foreach and fused), ms per step and achieved GB/s.

    python -m bench.adamw                 # GPU: gpt2-124M and gpt-1.3B shapes; CPU: a small set (reference path)
    python -m bench.adamw --sizes gpt2-124M --repeats 20

Bytes moved per step = 28 per parameter (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg,
exp_avg_sq, fp32); with bf16 master weights also 28 (fp32 master + moments, bf16 grad read and param written).
The ceiling is the device's copy bandwidth, measured in the same run (bytes read + written).
Goal on an H100: >= 85% of copy bandwidth and faster than torch's fused AdamW.
"""

import argparse

import torch

from bench.common import Results, bench_device, copy_bandwidth, time_fn
from tinygraft.kernels.adamw import FusedAdamW


def gpt_shapes(n_layer: int, d: int, vocab: int = 50257, block: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2-style model (tied head), in nn.Linear (out, in) layout."""
    shapes = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


SIZES = {
    "gpt2-124M": gpt_shapes(12, 768),
    "gpt-1.3B": gpt_shapes(24, 2048, block=2048),  # GPT-3 XL's shapes
    "gpt-small-6M": gpt_shapes(4, 256, vocab=8192, block=256),  # the CPU set: runs in seconds on 2 cores
}


def make_params(shapes, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=g).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, device=device, generator=g).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def impls(device):
    """name -> (optimizer factory, param dtype); each gets fresh params."""
    out = {
        "tinygraft": (lambda ps: FusedAdamW(ps, lr=1e-4), torch.float32),
        "torch-foreach": (lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True), torch.float32),
        "torch-fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), torch.float32),
    }
    if device.type == "cuda":
        out["tinygraft-bf16-master"] = (lambda ps: FusedAdamW(ps, lr=1e-4, master_weights=True), torch.bfloat16)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: what fits in ~1 s)")
    args = parser.parse_args(argv)
    device = bench_device()
    sizes = args.sizes or (["gpt2-124M", "gpt-1.3B"] if device.type == "cuda" else ["gpt-small-6M"])
    ceiling = copy_bandwidth(device)
    res = Results("adamw", device, notes={"copy_bandwidth_gbps": ceiling, "bytes_per_param": 28})
    for size in sizes:
        n_params = sum(torch.Size(s).numel() for s in SIZES[size])
        for name, (make, dtype) in impls(device).items():
            params = make_params(SIZES[size], device, dtype)
            opt = make(params)
            t = time_fn(opt.step, device=device, warmup=3, repeats=args.repeats)
            gbps = 28 * n_params / (t.median_ms * 1e-3) / 1e9
            res.add(
                size=size,
                params_m=round(n_params / 1e6, 1),
                impl=name,
                dtype=str(dtype).removeprefix("torch."),
                ms=t.median_ms,
                ms_p20=t.p20_ms,
                ms_p80=t.p80_ms,
                repeats=t.repeats,
                gbps=gbps,
                pct_copy=100 * gbps / ceiling,
            )
            del opt, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"copy bandwidth (read + write): {ceiling:.1f} GB/s")
    res.table(["size", "params_m", "impl", "dtype", "ms", "ms_p20", "ms_p80", "gbps", "pct_copy"])
    print("wrote", res.save(), res.plot(x="size", y="gbps", series="impl", ylabel="GB/s (28 B/param)", hline=ceiling))


if __name__ == "__main__":
    main()
