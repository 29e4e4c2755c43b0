"""Training-step throughput: tinygraft's GPT + loop step beside the same architecture in plain PyTorch.

    python -m bench.train_throughput                       # CPU: gpt-tiny; GPU: gpt-tiny and gpt2
    python -m bench.train_throughput --preset gpt2 --batch 16 --seq 1024 --compile

One step = forward + loss, backward, global grad-norm clip, AdamW step, zero grads; bf16 autocast on CUDA, fp32 on
a CPU, exactly as tinygraft/train/loop.py runs it (optimizer from train.optim.build_optimizer: tinygraft's
FusedAdamW on CUDA, torch's fused AdamW elsewhere). The baseline is nanoGPT's model.py in miniature: eager blocks,
F.scaled_dot_product_attention, torch.optim.AdamW(fused=True) (its fastest), same param groups,
same weights. Both are timed in the same run, interleaved round by round so a busy machine slows both alike.

Reported: ms per step, tokens/s, peak memory of a step (CUDA: max allocated; CPU: peak RSS growth), and on CUDA
the model FLOP rate and MFU against the measured bf16 matmul peak, counting 6N + 12 L H Q T FLOPs per token
(PaLM appendix B).
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Results, bench_device, peak_memory_mb, time_fn
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
def make_step(model, loss_fn, optimizer, device, grad_clip=1.0):
    autocast = device.type == "cuda"

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(preset: str, device, compile_: bool):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    ours = build_model(cfg).to(device)
    groups = param_groups(ours, Full().param_groups(ours), 0.1)
    ours_opt = build_optimizer(groups, "auto", device, 1e-4, (0.9, 0.95), 1e-8)
    plain = PlainGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device)
    copy_weights(ours, plain)
    plain_groups = param_groups(plain, [{"params": list(plain.parameters())}], 0.1)
    plain_opt = torch.optim.AdamW(plain_groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    m_ours = torch.compile(ours) if compile_ else ours
    m_plain = torch.compile(plain) if compile_ else plain
    steps = {
        "tinygraft": make_step(m_ours, lambda m, x, y: m(x, y)[1], ours_opt, device),
        "pytorch": make_step(m_plain, lambda m, x, y: m(x, y), plain_opt, device),
    }
    opt_name = f"{type(ours_opt).__module__.split('.')[0]} {type(ours_opt).__name__}"  # e.g. tinygraft FusedAdamW
    return cfg, steps, opt_name, sum(p.numel() for p in ours.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", help="gpt-tiny, gpt2 (repeatable)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 16 for gpt-tiny, 8 for gpt2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 128 for gpt-tiny, 1024 for gpt2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per implementation")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed steps per round")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--matmul-tflops", type=float, help="bf16 matmul peak for MFU (default: measured now, CUDA)")
    args = p.parse_args(argv)
    device = bench_device()
    presets = args.preset or (["gpt-tiny", "gpt2"] if device.type == "cuda" else ["gpt-tiny"])
    peak_tflops = args.matmul_tflops or (measured_matmul_tflops(device) if device.type == "cuda" else None)
    res = Results(
        "train_throughput-compile" if args.compile else "train_throughput",
        device,
        notes={"compile": args.compile, "rounds": args.rounds, "matmul_peak_tflops": peak_tflops},
    )
    for preset in presets:
        big = preset in ("gpt2", "bert-base")
        B, T = args.batch or (8 if big else 16), args.seq or (1024 if big else 128)
        cfg, steps, opt_name, n_params = build(preset, device, args.compile)
        T = min(T, cfg.block_size)
        g = torch.Generator().manual_seed(1)
        inputs = [
            tuple(torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2)) for _ in range(4)
        ]
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t = time_fn(step, inputs=inputs, device=device, warmup=2, budget_s=args.budget)
                times[name].append(t.median_ms)
        for name, step in steps.items():
            ms = statistics.median(times[name])
            mem = peak_memory_mb(lambda step=step, xy=inputs[0]: step(*xy), device)
            row = dict(
                preset=preset,
                impl=name,
                batch=B,
                seq=T,
                ms=ms,
                tokens_per_s=B * T / ms * 1e3,
                peak_mb=mem,
                optimizer=opt_name if name == "tinygraft" else "torch AdamW",
            )
            if peak_tflops:
                flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T
                row["tflops"] = flops_per_token * row["tokens_per_s"] / 1e12
                row["mfu"] = row["tflops"] / peak_tflops
            res.add(**row)
    cols = ["preset", "impl", "batch", "seq", "ms", "tokens_per_s", "peak_mb", "optimizer"]
    res.table(cols + (["tflops", "mfu"] if peak_tflops else []))
    for preset in presets:
        rows = {r["impl"]: r for r in res.rows if r["preset"] == preset}
        ratio = rows["tinygraft"]["tokens_per_s"] / rows["pytorch"]["tokens_per_s"]
        print(f"{preset}: tinygraft / pytorch tokens/s = {ratio:.3f}")
    print("saved", res.save(), res.plot(x="preset", y="tokens_per_s", series="impl", ylabel="tokens/s"))


def measured_matmul_tflops(device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device=device, warmup=3, budget_s=1.0, flush=False)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


if __name__ == "__main__":
    main()
