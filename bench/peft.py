"""Parameter-efficient methods side by side: trainable parameters, training-step time and peak memory per method on a
GPT, and `peft` on transformers' GPT-2 of the same shape for the methods both have (LoRA, DoRA, IA3).

    python -m bench.peft            # GPU: GPT-2 124M shape, B 8 x T 1024, bf16 autocast; CPU: a small GPT
    python -m bench.peft --quick    # small shapes (the default on a CPU)

One step = forward, causal-LM loss, backward, AdamW step over the trainable tensors, zero grads; training mode with
dropout 0.1 on the LoRA/DoRA input. The `lora x8` rows train 8 LoRA adapters on one batch whose rows name them in
turn: one mixed step (adapters.mixed_batch, the segmented kernel) against a forward + backward per adapter's rows
(peft refuses the mixed form in training; goal on a GPU >= 3x at 8 adapters, on the CPU at least not slower).
DoRA's cost over LoRA is what users report: peft ~2x, peft PR #1474. Prompt tuning reads 20 fewer real tokens, so
the model's positions hold its 20 virtual ones (the same T positions computed). Our GPT
and transformers' GPT2LMHeadModel get the same weights. Goals (DESIGN §7, issue 16): ours faster and leaner than
peft for LoRA, DoRA and IA3; DoRA <= 1.15x LoRA's step time.
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from bench.common import Results, bench_device, peak_memory_mb, time_fn
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.peft.adapters import adapter_parameters, mixed_batch, set_adapter
from tinygraft.peft.bottleneck import add_bottleneck
from tinygraft.peft.ia3 import add_ia3
from tinygraft.peft.lora import add_lora
from tinygraft.peft.prompt import add_prefix_tuning, add_prompt_tuning

R, ALPHA, DROPOUT = 8, 16, 0.1
OURS = {
    "lora": lambda m: add_lora(m, ["c_attn", "c_proj", "c_fc"], r=R, alpha=ALPHA, dropout=DROPOUT),
    "dora": lambda m: add_lora(m, ["c_attn", "c_proj", "c_fc"], r=R, alpha=ALPHA, dropout=DROPOUT, use_dora=True),
    "ia3": add_ia3,
    "houlsby": lambda m: add_bottleneck(m, "houlsby"),
    "pfeiffer": lambda m: add_bottleneck(m, "pfeiffer"),
    "prompt-tuning": lambda m: add_prompt_tuning(m, 20),
    "prefix-tuning": lambda m: add_prefix_tuning(m, 20),
}
N_ADAPTERS = 8  # the mixed-batch rows: one batch naming 8 LoRA adapters, against a step per adapter's rows


def _peft_model(hf, method):
    import peft  # noqa: PLC0415 (the reference, a dev dependency)

    if method == "ia3":
        config = peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
    else:
        targets = ["c_attn", "c_proj", "c_fc"]
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets,
                                 use_dora=method == "dora")  # fmt: skip
    return peft.get_peft_model(hf, config)


def _hf_gpt2(ours: GPT):
    import transformers  # noqa: PLC0415 (the reference, a dev dependency)

    c = ours.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # fmt: skip
    state = {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
             for k, v in ours.state_dict().items()}  # fmt: skip
    hf.load_state_dict(state, strict=False)
    return hf


def step_fn(model, device, hf: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x, y):
        with amp:
            logits = model(input_ids=x).logits if hf else model(x)[0]
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def mixed_steps(base, device, B):
    """(the mixed step, the per-adapter loop step, trainable count) over 8 LoRA adapters on one base."""
    model = copy.deepcopy(base)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for name in names:
        add_lora(model, ["c_attn", "c_proj", "c_fc"], r=R, alpha=ALPHA, dropout=DROPOUT, adapter_name=name)
    params = [p for name in names for p in adapter_parameters(model, name)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = [names[i % N_ADAPTERS] for i in range(B)]

    def loss_of(x, y):
        logits = model(x)[0]
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")

    def mixed(x, y):
        with amp, mixed_batch(model, rows):
            (loss_of(x, y) / y.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def loop(x, y):
        for i, name in enumerate(names):
            set_adapter(model, name)
            with amp:
                (loss_of(x[i::N_ADAPTERS], y[i::N_ADAPTERS]) / y.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return mixed, loop, sum(p.numel() for p in params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    parser.add_argument("--methods", default=",".join(OURS), help="comma-separated, of " + ", ".join(OURS))
    parser.add_argument("--no-peft", action="store_true", help="skip the peft + transformers rows")
    parser.add_argument("--no-mixed", action="store_true", help="skip the 8-adapter mixed-batch rows")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per row (1 s GPU, 0.5 s CPU)")
    args = parser.parse_args(argv)
    device = bench_device()
    quick = args.quick or device.type != "cuda"
    cfg = GPTConfig(vocab_size=2048, block_size=128, n_layer=2, n_head=4, n_embd=128) if quick else GPTConfig()
    B, T = (4, 128) if quick else (8, 1024)
    budget = args.budget_s or (1.0 if device.type == "cuda" else 0.5)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in OURS]
    if unknown:
        parser.error(f"--methods: {unknown[0]!r} is not one of {', '.join(OURS)}")
    torch.manual_seed(0)
    base = GPT(cfg).to(device).train()
    g = torch.Generator().manual_seed(1)
    inputs = [
        tuple(torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2)) for _ in range(2)
    ]
    notes = {"B": B, "T": T, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "r": R, "dropout": DROPOUT,
             "amp": "bf16" if device.type == "cuda" else "fp32"}  # fmt: skip
    res = Results("peft", device, notes=notes)
    for method in methods:
        impls = {"tinygraft": (copy.deepcopy(base), False)}
        if method in ("lora", "dora", "ia3") and not args.no_peft:
            impls["peft"] = (_peft_model(_hf_gpt2(base).to(device).train(), method), True)
        for impl, (model, hf) in impls.items():
            if impl == "tinygraft":
                OURS[method](model)
            step, trainable = step_fn(model, device, hf)
            ins = [(x[:, : T - 20], y[:, : T - 20]) for x, y in inputs] if method == "prompt-tuning" else inputs
            t = time_fn(step, inputs=ins, device=device, warmup=2, budget_s=budget)
            mem = peak_memory_mb(lambda step=step, ins=ins: step(*ins[0]), device)
            res.add(method=method, impl=impl, trainable=trainable, trainable_pct=100 * trainable / sum(
                p.numel() for p in base.parameters()), ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                tokens_per_s=B * T / t.median_ms * 1e3, peak_mb=mem)  # fmt: skip
            del model
    if not args.no_mixed:
        xs = [tuple(torch.randint(0, cfg.vocab_size, (N_ADAPTERS, T), generator=g).to(device) for _ in range(2))
              for _ in range(2)]  # fmt: skip
        mixed, loop, trainable = mixed_steps(base, device, N_ADAPTERS)
        for impl, step in (("tinygraft mixed", mixed), ("per-adapter loop", loop)):
            t = time_fn(step, inputs=xs, device=device, warmup=2, budget_s=budget)
            mem = peak_memory_mb(lambda step=step: step(*xs[0]), device)
            res.add(method=f"lora x{N_ADAPTERS}", impl=impl, trainable=trainable, trainable_pct=100 * trainable / sum(
                p.numel() for p in base.parameters()), ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                tokens_per_s=N_ADAPTERS * T / t.median_ms * 1e3, peak_mb=mem)  # fmt: skip
    res.table(["method", "impl", "trainable", "trainable_pct", "ms", "p20_ms", "p80_ms", "tokens_per_s", "peak_mb"])
    by = {(r["method"], r["impl"]): r for r in res.rows}
    if ("dora", "tinygraft") in by and ("lora", "tinygraft") in by:
        ratio = by["dora", "tinygraft"]["ms"] / by["lora", "tinygraft"]["ms"]
        res.data["notes"]["dora_over_lora"] = ratio
        print(f"DoRA / LoRA step time: {ratio:.2f}x (goal <= 1.15x)")
    for method in ("lora", "dora", "ia3"):
        if (method, "peft") in by and (method, "tinygraft") in by:
            ours, theirs = by[method, "tinygraft"], by[method, "peft"]
            print(f"{method}: peft / tinygraft step time {theirs['ms'] / ours['ms']:.2f}x, peak MB "
                  f"{ours['peak_mb']:.0f} vs peft {theirs['peak_mb']:.0f} (goal: faster and leaner)")  # fmt: skip
    key = f"lora x{N_ADAPTERS}"
    if (key, "tinygraft mixed") in by:
        speedup = by[key, "per-adapter loop"]["ms"] / by[key, "tinygraft mixed"]["ms"]
        res.data["notes"]["mixed_over_loop_speedup"] = speedup
        print(f"{N_ADAPTERS} adapters in one mixed batch: {speedup:.2f}x the per-adapter loop's speed "
              "(goal: >= 3x on a GPU, >= 1x on the CPU)")  # fmt: skip
    print("wrote", res.save(), res.plot(x="method", y="ms", series="impl", ylabel="ms per training step"))


if __name__ == "__main__":
    main()
