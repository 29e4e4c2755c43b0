"""Attention forward and forward+backward: tinygraft's flash_attention against PyTorch's SDPA backends and eager.

    python -m bench.attention                      # GPU: bf16, T 512..16k, D 64 and 128, causal and not
    python -m bench.attention --seq 2048 --dims 128 --modes fwd+bwd

Shapes follow FlashAttention-2's benchmark: a fixed budget of tokens per batch (B = tokens / T) and a fixed hidden
size (H = hidden / D). FLOPs: forward 4*B*H*T*S*D, halved when causal; backward 2.5x the
forward, so forward+backward counts 3.5x. Implementations: `tinygraft` (flash_attention; the backend line says
which path ran), `sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient`, `sdpa-math` (each forced with `sdpa_kernel`), and
`eager` (the naive matmul-softmax-matmul reference). A backend that cannot run a shape gets a row saying why;
eager and math are skipped where their (B, H, T, S) score matrix would not fit comfortably.

On a CPU this runs a tiny fp32 case (the reference path, or the Triton kernel under TRITON_INTERPRET=1 with
TINYGRAFT_BACKEND=triton), so the script is exercised; the performance goals need a GPU.
"""

import argparse
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import Results, bench_device, peak_memory_mb, time_fn
from tinygraft.kernels.attention import attention_reference, flash_attention

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _impl(name: str, causal: bool):
    if name == "tinygraft":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal)
    if name == "eager":
        return lambda q, k, v: attention_reference(q, k, v, causal=causal)
    backend = SDPA_BACKENDS[name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _step(fn, mode: str):
    if mode == "fwd":
        return lambda q, k, v, do: fn(q, k, v)
    return lambda q, k, v, do: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def _score_gib(B, H, T, dtype) -> float:
    return B * H * T * T * torch.finfo(dtype).bits / 8 / 2**30


def run_case(res, dev, impl, mode, B, H, T, D, causal, dtype, max_score_gib, budget_s):
    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0) * (1.0 if mode == "fwd" else 3.5)
    row = dict(mode=mode, D=D, causal=causal, T=T, B=B, H=H, impl=impl)
    if impl in ("eager", "sdpa-math") and _score_gib(B, H, T, dtype) > max_score_gib:
        return res.add(
            **row,
            ms=None,
            tflops=None,
            peak_mb=None,
            max_err=None,
            note=f"skipped: {_score_gib(B, H, T, dtype):.1f} GiB score matrix",
        )
    gen = torch.Generator(device=dev).manual_seed(T * D)
    q, k, v, do = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(mode != "fwd")
    fn = _impl(impl, causal)
    step = _step(fn, mode)
    try:
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            out = fn(q, k, v)
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # torch's pick
            max_err = (out.float() - expected.float()).abs().max().item()
            del out, expected
            t = time_fn(step, inputs=[(q, k, v, do)], device=dev, budget_s=budget_s)
            peak = peak_memory_mb(lambda: step(q, k, v, do), dev)
    except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that cannot run this shape says so
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return res.add(**row, ms=None, tflops=None, peak_mb=None, max_err=None, note=str(e).splitlines()[0][:80])
    return res.add(
        **row, ms=t.median_ms, tflops=flops / (t.median_ms * 1e-3) / 1e12, peak_mb=peak, max_err=max_err, note=""
    )


def plot(res, modes, dims) -> None:
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    panels = [(m, d, c) for m in modes for d in dims for c in (False, True)]
    cols = 4 if len(panels) >= 4 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (mode, D, causal) in zip(axes.flat, panels):
        sel = [r for r in res.rows if (r["mode"], r["D"], r["causal"]) == (mode, D, causal) and r["tflops"]]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = [(r["T"], r["tflops"]) for r in sel if r["impl"] == impl]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, D={D}, {'causal' if causal else 'non-causal'}", fontsize=9)
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"attention: {res.data['device']}", fontsize=9)
    fig.tight_layout()
    res.dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(res.dir / "attention.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    dev = bench_device()
    gpu = dev.type == "cuda"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="512,1024,2048,4096,8192,16384" if gpu else "64,128")
    ap.add_argument("--dims", default="64,128" if gpu else "64")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument(
        "--impls", default=",".join(["tinygraft", *SDPA_BACKENDS, "eager"]) if gpu else "tinygraft,sdpa-math,eager"
    )
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16" if gpu else "fp32")
    ap.add_argument("--tokens", type=int, default=16384 if gpu else 256, help="B = tokens // T")
    ap.add_argument("--hidden", type=int, default=2048 if gpu else 128, help="H = hidden // D")
    ap.add_argument("--max-score-gib", type=float, default=8.0, help="skip eager/math above this score matrix")
    ap.add_argument("--budget-s", type=float, default=0.3 if gpu else 0.1, help="timing budget per case")
    args = ap.parse_args(argv)
    seqs, dims = [int(s) for s in args.seq.split(",")], [int(d) for d in args.dims.split(",")]
    modes, impls, dtype = args.modes.split(","), args.impls.split(","), DTYPES[args.dtype]

    res = Results(
        "attention",
        dev,
        notes={
            "dtype": args.dtype,
            "tokens": args.tokens,
            "hidden": args.hidden,
            "flops": "fwd 4*B*H*T*S*D (causal /2); fwd+bwd 3.5x fwd",
            "max_err": "max |out - SDPA with torch's own backend choice|",
        },
    )
    for mode in modes:
        for D in dims:
            for causal in (False, True):
                for T in seqs:
                    B, H = max(1, args.tokens // T), max(1, args.hidden // D)
                    for impl in impls:
                        run_case(res, dev, impl, mode, B, H, T, D, causal, dtype, args.max_score_gib, args.budget_s)
    res.table(["mode", "D", "causal", "T", "B", "H", "impl", "ms", "tflops", "peak_mb", "max_err", "note"])
    print("saved", res.save())
    plot(res, modes, dims)


if __name__ == "__main__":
    main()
