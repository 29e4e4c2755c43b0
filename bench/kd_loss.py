"""The distillation loss over a GPT-2 vocabulary: the chunked path (kernels/kd_loss.py) against the eager loss that
materialises both models' logits, loss + backward to the student's hidden states and head weight, in one run.

    python -m bench.kd_loss            # GPU: V 50,257, 8,192 tokens, width 768 (the issue's shape), bf16 inputs;
                                       # CPU: V 50,257, 4,096 tokens, width 768, fp32, chunk 128
    python -m bench.kd_loss --quick    # toy shapes (V 4,096, 256 tokens: what gpu.sh --dry-run walks)

Goal (issue 17): at most 20% of eager's peak memory and no slower. On a CPU this measures the chunked PyTorch path;
a Triton kernel's figures come with a GPU.
"""

import argparse

import torch

from bench.common import Results, bench_device, peak_memory_mb, time_fn
from tinygraft.kernels.kd_loss import kd_divergence, kd_loss

T = 2.0


def eager(h_s, w_s, h_t, w_t, labels):
    with torch.no_grad():
        teacher = h_t @ w_t.t()
    loss = kd_divergence(h_s @ w_s.t(), teacher, T, mask=labels != -100)
    loss.backward()
    return loss


def chunked(chunk):
    def run(h_s, w_s, h_t, w_t, labels):
        loss = kd_loss(h_s, w_s, h_t, w_t, labels, T, chunk=chunk)
        loss.backward()
        return loss

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy shapes")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per row")
    parser.add_argument("--tokens", type=int, default=None)
    args = parser.parse_args(argv)
    device = bench_device()
    cuda = device.type == "cuda"
    V = 4096 if args.quick else 50257
    N = args.tokens or (256 if args.quick else 8192 if cuda else 4096)
    C, dtype = 768, (torch.bfloat16 if cuda else torch.float32)
    chunk = 1024 if cuda else 128
    g = torch.Generator().manual_seed(0)
    make = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device, dtype)  # noqa: E731
    h_s, w_s, h_t, w_t = make(N, C).requires_grad_(), make(V, C).requires_grad_(), make(N, C), make(V, C)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[::10] = -100
    res = Results("kd_loss", device, notes={"V": V, "tokens": N, "width": C, "dtype": str(dtype), "chunk": chunk})
    budget = args.budget_s or (1.0 if device.type == "cuda" else 3.0)
    losses = {}
    for impl, fn in (("eager", eager), ("tinygraft chunked", chunked(chunk))):

        def step(fn=fn):
            h_s.grad = w_s.grad = None
            return fn(h_s, w_s, h_t, w_t, labels)

        losses[impl] = float(step())
        t = time_fn(step, device=device, warmup=1, budget_s=budget)
        mem = peak_memory_mb(step, device)
        res.add(impl=impl, ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, peak_mb=mem, loss=losses[impl])
    res.table(["impl", "ms", "p20_ms", "p80_ms", "peak_mb", "loss"])
    by = {r["impl"]: r for r in res.rows}
    e, c = by["eager"], by["tinygraft chunked"]
    memory = c["peak_mb"] / e["peak_mb"] if e["peak_mb"] > 0 else float("nan")  # toy shapes: RSS may not grow
    res.data["notes"].update(memory_ratio=memory, time_ratio=c["ms"] / e["ms"])
    print(f"chunked / eager: peak memory {memory:.1%} (goal <= 20%), time {c['ms'] / e['ms']:.2f}x (goal <= 1x); "
          f"losses agree to {abs(c['loss'] - e['loss']):.2e}")  # fmt: skip
    print("wrote", res.save(), res.plot(x="impl", y="peak_mb", series="impl", ylabel="peak MB (loss + backward)"))


if __name__ == "__main__":
    main()
