"""Mixed-adapter batches: the segmented LoRA kernel vs the PyTorch ways to give every row its own adapter.

    python -m bench.lora_segmented            # GPU: bf16, 8 adapters, tokens 4096, in = out = 768 (GPT-2), r 8
    python -m bench.lora_segmented --quick    # small shapes (what runs on a CPU, against the reference path)

Every row of the batch names one of G adapters (uniformly at random, so each adapter holds about M / G rows).
Implementations, each timed forward (no grad) and forward+backward (x requires grad as inside a network, W frozen,
A and B trainable; gradients of x, A and B):

- `tinygraft`: `segmented_lora_linear`, one launch per product with the rows grouped by adapter inside the kernels
  (its timing includes building the row grouping, every call).
- `loop`: per adapter, index_select its rows, F.linear + the low-rank product, index_copy back: G times the
  launches. Its row indices are computed once outside the timing (the advantage of a batch reused by every layer).
- `gather_bmm`: per row, gather that row's A and B (M x r x in and M x out x r copies) and two bmm's.
- `onehot`: every adapter's low-rank product on every row, kept by a one-hot of the row's adapter (G times the
  LoRA FLOPs in dense matmuls; what `segmented_lora_linear_reference` does, and what runs on a CPU).
- `base`: the frozen base matmul alone, the floor.

It reports ms and peak memory, checks every output against the loop's, and names the strongest PyTorch baseline
(the fastest of loop, gather_bmm, onehot) per pass.
"""

import argparse

import torch
import torch.nn.functional as F

from bench.common import Results, bench_device, peak_memory_mb, time_fn
from tinygraft.kernels.backend import backend_for
from tinygraft.kernels.lora_segmented import segmented_lora_linear, segmented_lora_linear_reference

GPU_SHAPE = dict(tokens=4096, in_f=768, out_f=768, r=8, adapters=8)
CPU_SHAPE = dict(tokens=512, in_f=256, out_f=256, r=8, adapters=8)
ALPHA = 16.0
BASELINES = ("loop", "gather_bmm", "onehot")


def loop_fn(w, a, b, scaling, ids):
    """The per-adapter loop a user writes first; row indices per adapter precomputed (outside the timing)."""
    groups = [(g, torch.nonzero(ids == g).squeeze(1)) for g in range(a.shape[0])]

    def fn(x):
        y = x.new_empty(x.shape[0], w.shape[0])
        for g, rows in groups:
            xg = x.index_select(0, rows)
            yg = F.linear(xg, w) + scaling[g] * F.linear(F.linear(xg, a[g]), b[g])
            y = y.index_copy(0, rows, yg)
        return y

    return fn


def gather_bmm_fn(w, a, b, scaling, ids):
    """Per-row gather of each row's adapter, then batched matmuls of one row each."""
    scale = torch.tensor(scaling, device=w.device, dtype=w.dtype)[ids]

    def fn(x):
        s = torch.bmm(x[:, None, :], a[ids].transpose(1, 2))  # (M, 1, r)
        low = torch.bmm(s, b[ids].transpose(1, 2))[:, 0]  # (M, out)
        return F.linear(x, w) + scale[:, None] * low

    return fn


def implementations(w, a, b, scaling, ids):
    """name -> (forward fn of x, trainable tensors whose gradients the backward computes besides x)."""
    return {
        "base": (lambda x: F.linear(x, w), []),
        "tinygraft": (lambda x: segmented_lora_linear(x, w, None, a, b, scaling, ids), [a, b]),
        "loop": (loop_fn(w, a, b, scaling, ids), [a, b]),
        "gather_bmm": (gather_bmm_fn(w, a, b, scaling, ids), [a, b]),
        "onehot": (lambda x: segmented_lora_linear_reference(x, w, None, a, b, scaling, ids), [a, b]),
    }


def run_case(res, dev, dtype, tokens, in_f, out_f, r, adapters, budget_s):
    G = adapters
    w = torch.randn(out_f, in_f, device=dev, dtype=dtype) / in_f**0.5
    a = (torch.randn(G, r, in_f, device=dev, dtype=dtype) / in_f**0.5).requires_grad_()
    b = (torch.randn(G, out_f, r, device=dev, dtype=dtype) / r**0.5).requires_grad_()
    scaling = [ALPHA / r] * G
    ids = torch.randint(0, G, (tokens,), device=dev)
    xs = [torch.randn(tokens, in_f, device=dev, dtype=dtype).requires_grad_() for _ in range(2)]
    grad = torch.randn(tokens, out_f, device=dev, dtype=dtype)
    impls = implementations(w, a, b, scaling, ids)
    with torch.no_grad():
        expected = impls["loop"][0](xs[0]).float()
    case = f"{in_f}x{out_f} r{r} G{G} T{tokens}"
    for name, (fn, params) in impls.items():
        with torch.no_grad():
            err = (fn(xs[0]).float() - expected).abs().max().item() if name != "base" else None

        def forward(x, fn=fn):
            with torch.no_grad():
                return fn(x)

        def forward_backward(x, fn=fn, params=params):
            return torch.autograd.grad(fn(x), [x, *params], grad)

        for label, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
            t = time_fn(step, inputs=[(x,) for x in xs], device=dev, budget_s=budget_s)
            mem = peak_memory_mb(lambda step=step: step(xs[0]), device=dev)
            res.add(case=case, pass_=label, impl=name, tokens=tokens, in_f=in_f, out_f=out_f, r=r, adapters=G,
                    ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, peak_mb=mem,
                    max_err_vs_loop=err)  # fmt: skip


def summary_lines(rows) -> list[str]:
    """Per case and pass: tinygraft against the strongest baseline, and over the base matmul alone."""
    by = {(r["case"], r["pass_"], r["impl"]): r for r in rows}
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for label in ("fwd", "fwd+bwd"):
            ours, base = by.get((case, label, "tinygraft")), by.get((case, label, "base"))
            rivals = [by[case, label, n] for n in BASELINES if (case, label, n) in by]
            if not (ours and base and rivals):
                continue
            best = min(rivals, key=lambda r: r["ms"])
            lines.append(
                f"{case} {label}: tinygraft {ours['ms']:.3g} ms, strongest baseline {best['impl']} "
                f"{best['ms']:.3g} ms ({best['ms'] / ours['ms']:.2f}x), base alone {base['ms']:.3g} ms "
                f"(tinygraft/base {ours['ms'] / base['ms']:.2f}x)"
            )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="bfloat16 on a GPU, float32 on a CPU by default")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per case (1 s GPU, 0.3 s CPU)")
    args = parser.parse_args(argv)
    dev = bench_device()
    budget_s = args.budget_s or (1.0 if dev.type == "cuda" else 0.3)
    quick = args.quick or dev.type != "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    shape = CPU_SHAPE if quick else GPU_SHAPE
    probe = torch.empty(1, device=dev)
    notes = {"dtype": str(dtype).removeprefix("torch."), "alpha": ALPHA, "dropout": 0.0,
             "rows": "each row's adapter uniform over the G adapters",
             "tinygraft_path": backend_for(probe)}  # fmt: skip
    res = Results("lora_segmented", dev, notes=notes)
    torch.manual_seed(0)
    run_case(res, dev, dtype, budget_s=budget_s, **shape)
    res.table(["case", "pass_", "impl", "ms", "peak_mb", "max_err_vs_loop"])
    lines = summary_lines(res.rows)
    if res.data["notes"]["tinygraft_path"] != "triton":
        lines.append("'tinygraft' ran the PyTorch reference here (the one-hot form, as 'onehot'); only a GPU run "
                     "with the Triton kernels measures the segmented kernels")  # fmt: skip
    res.data["notes"]["summary"] = lines
    print("\n".join(lines))
    print("saved", res.save())
    print("plot", res.plot(x="pass_", y="ms", series="impl", ylabel="ms (lower is better)"))


if __name__ == "__main__":
    main()
