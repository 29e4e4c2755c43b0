"""Training-step throughput: tinygraft's GPT + loop step beside the same architecture in plain PyTorch.

    python -m bench.train_throughput                       # CPU: gpt-tiny; GPU: gpt-tiny and gpt2
    python -m bench.train_throughput --preset gpt2 --batch 16 --seq 1024 --compile

One step = forward + loss, backward, global grad-norm clip, AdamW step, zero grads, exactly as
tinygraft/train/loop.py runs it (optimizer from train.optim.build_optimizer: tinygraft's FusedAdamW on CUDA, torch's
fused AdamW elsewhere), in each precision: fp32 and `auto` (core/precision.py: bf16 autocast on CUDA and on a CPU
with AMX or AVX512-BF16). The baseline is nanoGPT's model.py in miniature: eager blocks,
F.scaled_dot_product_attention, torch.optim.AdamW(fused=True) (its fastest), same param groups, same weights, in
fp32 and in bf16 autocast (the strongest PyTorch baseline in each precision). All are timed in the same run,
interleaved round by round so a busy machine slows every row alike.

Reported: ms per step, tokens/s, peak memory of a step (CUDA: max allocated; CPU: peak RSS growth), and the model
FLOP rate against the matmul peak of the row's precision measured in the same run (bench/common.py: 6N + 12 L d T
FLOPs per token, PaLM appendix B), on a CPU as on a GPU.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    Results,
    bench_device,
    flop_rate,
    matmul_params,
    matmul_peak_gflops,
    model_flops_per_token,
    peak_memory_mb,
    time_fn,
)
from tinygraft.core import precision
from tinygraft.models.presets import build_model, get_preset
from tinygraft.train.methods import Full
from tinygraft.train.optim import build_optimizer, param_groups


# ----------------------------------------------------------------------------------- the plain-PyTorch baseline
class PlainBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList([PlainBlock(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def copy_weights(ours: nn.Module, plain: PlainGPT) -> None:
    """Same numbers in both models (the names differ only in nesting)."""
    src = dict(ours.named_parameters())
    with torch.no_grad():
        plain.wte.weight.copy_(src["transformer.wte.weight"])
        plain.wpe.weight.copy_(src["transformer.wpe.weight"])
        plain.ln_f.weight.copy_(src["transformer.ln_f.weight"])
        plain.ln_f.bias.copy_(src["transformer.ln_f.bias"])
        for i, b in enumerate(plain.h):
            pre = f"transformer.h.{i}."
            pairs = [(b.ln_1, "ln_1"), (b.ln_2, "ln_2"), (b.c_attn, "attn.c_attn"), (b.c_proj, "attn.c_proj"),
                     (b.c_fc, "mlp.c_fc"), (b.mlp_proj, "mlp.c_proj")]  # fmt: skip
            for mod, name in pairs:
                mod.weight.copy_(src[pre + name + ".weight"])
                mod.bias.copy_(src[pre + name + ".bias"])


# ----------------------------------------------------------------------------------------------- the two steps
def make_step(model, loss_fn, optimizer, device, bf16: bool, grad_clip=1.0):
    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(preset: str, device, compile_: bool):
    """{(impl, precision): step}: tinygraft in fp32 and `auto`, the plain model in fp32 and bf16 autocast, each
    with its own copy of the same weights and its own optimizer."""
    cfg = get_preset(preset)
    auto = precision.resolve("auto", device)
    steps, opt_name = {}, None
    for prec in ("fp32", "auto"):
        torch.manual_seed(0)
        ours = build_model(cfg).to(device)
        opt = build_optimizer(param_groups(ours, Full().param_groups(ours), 0.1), "auto", device, 1e-4, (0.9, 0.95),
                              1e-8)  # fmt: skip
        m = torch.compile(ours) if compile_ else ours
        bf16 = prec == "auto" and auto.dtype is not None
        steps[("tinygraft", f"auto ({auto.name})" if prec == "auto" else prec)] = make_step(
            m, lambda m, x, y: m(x, y)[1], opt, device, bf16
        )
        opt_name = f"{type(opt).__module__.split('.')[0]} {type(opt).__name__}"  # e.g. tinygraft FusedAdamW
    for prec in ("fp32", "bf16"):
        plain = PlainGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device)
        copy_weights(ours, plain)
        plain_groups = param_groups(plain, [{"params": list(plain.parameters())}], 0.1)
        plain_opt = torch.optim.AdamW(plain_groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        m_plain = torch.compile(plain) if compile_ else plain
        steps[("pytorch", prec)] = make_step(m_plain, lambda m, x, y: m(x, y), plain_opt, device, prec == "bf16")
    return cfg, steps, opt_name, matmul_params(ours)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", help="gpt-tiny, gpt2 (repeatable)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 16 for gpt-tiny, 8 for gpt2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 128 for gpt-tiny, 1024 for gpt2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per implementation")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed steps per round")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = p.parse_args(argv)
    device = bench_device()
    presets = args.preset or (["gpt-tiny", "gpt2"] if device.type == "cuda" else ["gpt-tiny"])
    peaks = {"fp32": matmul_peak_gflops(device, torch.float32), "bf16": matmul_peak_gflops(device, torch.bfloat16)}
    res = Results(
        "train_throughput-compile" if args.compile else "train_throughput",
        device,
        notes={"compile": args.compile, "rounds": args.rounds, "matmul_peak_gflops": peaks},
    )
    for preset in presets:
        big = preset in ("gpt2", "bert-base")
        B, T = args.batch or (8 if big else 16), args.seq or (1024 if big else 128)
        cfg, steps, opt_name, n_matmul = build(preset, device, args.compile)
        T = min(T, cfg.block_size)
        g = torch.Generator().manual_seed(1)
        inputs = [
            tuple(torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2)) for _ in range(4)
        ]
        times = {key: [] for key in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                t = time_fn(step, inputs=inputs, device=device, warmup=2, budget_s=args.budget)
                times[key].append(t.median_ms)
        flops_per_token = model_flops_per_token(n_matmul, cfg.n_layer, cfg.n_embd, T)
        for (impl, prec), step in steps.items():
            ms = statistics.median(times[(impl, prec)])
            mem = peak_memory_mb(lambda step=step, xy=inputs[0]: step(*xy), device)
            row = dict(preset=preset, impl=impl, precision=prec, batch=B, seq=T, ms=ms, tokens_per_s=B * T / ms * 1e3,
                       peak_mb=mem, optimizer=opt_name if impl == "tinygraft" else "torch AdamW")  # fmt: skip
            res.add(**flop_rate(row, flops_per_token, row["tokens_per_s"], peaks["bf16" if "bf16" in prec else "fp32"]))
    cols = ["preset", "impl", "precision", "batch", "seq", "ms", "tokens_per_s", "peak_mb", "model_gflops", "of_peak"]
    res.table(cols + ["optimizer"])
    for preset in presets:
        rows = [r for r in res.rows if r["preset"] == preset]
        best_plain = max((r for r in rows if r["impl"] == "pytorch"), key=lambda r: r["tokens_per_s"])
        for r in (r for r in rows if r["impl"] == "tinygraft"):
            same = next(p for p in rows if p["impl"] == "pytorch" and p["precision"] in r["precision"])
            print(f"{preset}: tinygraft {r['precision']} / pytorch {same['precision']} tokens/s = "
                  f"{r['tokens_per_s'] / same['tokens_per_s']:.3f}; / the fastest pytorch ({best_plain['precision']})"
                  f" = {r['tokens_per_s'] / best_plain['tokens_per_s']:.3f}")  # fmt: skip
    for r in res.rows:
        r["series"] = f"{r['impl']} {r['precision']}"
    print("saved", res.save(), res.plot(x="preset", y="tokens_per_s", series="series", ylabel="tokens/s"))


if __name__ == "__main__":
    main()
