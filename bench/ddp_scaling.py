"""Data-parallel scaling: training tokens/s at 1 and N processes under torchrun, and the scaling efficiency.

    python -m bench.ddp_scaling                      # CPU: 1 and 2 processes, one thread each (gloo)
    python -m bench.ddp_scaling --procs 1,2,4,8      # a GPU machine: one GPU per process (NCCL)
    python -m bench.ddp_scaling --quick              # toy sizes, one round (what gpu.sh --dry-run walks)

Weak scaling, as DDP is used: every process keeps the same rows per step (`--rows`), so N processes train a global
batch N times as large; efficiency = tokens/s(N) / (N * tokens/s(1)). On the CPU each process gets one thread
(OMP_NUM_THREADS=1) and the machine one process per core, so a second process brings a second core and nothing
else. Goals (../shared/DESIGN.md): >= 85% on 2 CPU processes, >= 90% on GPUs.

Two rows per process count, launched the same way and interleaved round by round:
  - tinygraft: `tinygraft pretrain` itself (every rank draws the global batch and keeps its slice, dropout keyed on
    the global row, the loss weighted by the global count, one small all-reduce a step for the loss and a Ctrl-C);
    tokens/s from the steady-state rows of its metrics.jsonl (the first WARMUP steps dropped);
  - plain DDP: the same GPT under DistributedDataParallel in a bare loop (each rank its own random batch,
    torch.optim.AdamW fused, nothing else): the strongest PyTorch baseline, and what tinygraft's extras cost.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Results, bench_device

WARMUP = 5


def launch(n: int, args: list[str], env: dict, timeout: int = 1200) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def tinygraft_tokens_per_s(n: int, a, tmp: Path, env: dict) -> float:
    out = tmp / f"tg-{n}"
    sets = {"train.seq_len": a.seq, "train.batch_size": a.rows * n, "train.eval_every": a.steps,
            "train.eval_batches": 1, "train.log_every": 1, "train.warmup_steps": 1, "model.dropout": 0.1}  # fmt: skip
    flags = [f"--set={k}={v}" for k, v in sets.items()]
    launch(n, ["-m", "tinygraft", "pretrain", "--out", str(out), "--overwrite", "--preset", a.preset, "--steps",
               str(a.steps), "--precision", a.precision, *flags], env)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["split"] == "train" and r["step"] > WARMUP]
    return statistics.median(rates)


def plain_tokens_per_s(n: int, a, tmp: Path, env: dict) -> float:
    out = tmp / f"plain-{n}.json"
    launch(n, ["-m", "bench.ddp_scaling", "--worker", str(out), "--preset", a.preset, "--rows", str(a.rows),
               "--seq", str(a.seq), "--steps", str(a.steps), "--precision", a.precision], env)  # fmt: skip
    return json.loads(out.read_text())["tokens_per_s"]


def worker(a) -> None:
    """One rank of the plain-DDP baseline (run by torchrun)."""
    from tinygraft.core import precision  # noqa: PLC0415 (the worker's own imports)
    from tinygraft.models.presets import build_model, get_preset  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)
    cfg = get_preset(a.preset)
    cfg.dropout = 0.1  # as tinygraft's row runs it
    model = build_model(cfg).to(device).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    autocast = precision.autocast(device, precision.resolve(a.precision, device))
    g = torch.Generator().manual_seed(int(os.environ["RANK"]))
    times = []
    for _ in range(a.steps):
        x = torch.randint(0, cfg.vocab_size, (a.rows, a.seq + 1), generator=g).to(device)
        t0 = time.perf_counter()
        with autocast():
            loss = ddp(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rate = a.rows * a.seq * torch.distributed.get_world_size() / statistics.median(times[WARMUP:])
    if int(os.environ["RANK"]) == 0:
        Path(a.worker).write_text(json.dumps({"tokens_per_s": rate}))
    torch.distributed.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default=None, help="process counts (default: 1,2 on a CPU, 1..GPUs on CUDA)")
    p.add_argument("--preset", default="gpt-tiny")
    p.add_argument("--rows", type=int, default=8, help="rows per process per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--quick", action="store_true", help="toy sizes: 2 rows of 32 tokens, 8 steps, one round")
    p.add_argument("--budget-s", type=float, default=None,
                   help="taken for bench/gpu.sh (every extra takes it); a launch here runs --steps steps")  # fmt: skip
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.seq, a.steps, a.rounds = 2, 32, WARMUP + 3, 1
    if a.worker:
        return worker(a)
    dev = bench_device()
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    procs = [int(v) for v in (a.procs or (",".join(str(2**i) for i in range(4) if 2**i <= gpus) or "1,2")).split(",")]
    if dev.type == "cpu" and max(procs) > (os.cpu_count() or 1):
        sys.exit(f"{max(procs)} processes of one thread need {max(procs)} cores; this machine has {os.cpu_count()}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = Results("ddp_scaling", dev, notes={
        "preset": a.preset, "rows_per_process": a.rows, "seq": a.seq, "steps": a.steps, "precision": a.precision,
        "threads_per_process": 1 if dev.type == "cpu" else None, "backend": "nccl" if gpus else "gloo",
        "rounds": a.rounds, "command": "python -m bench.ddp_scaling " + " ".join(argv or sys.argv[1:])})  # fmt: skip
    rates = {(impl, n): [] for impl in ("tinygraft", "plain DDP") for n in procs}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.rounds):
            for n in procs:
                rates[("tinygraft", n)].append(tinygraft_tokens_per_s(n, a, Path(d), env))
                rates[("plain DDP", n)].append(plain_tokens_per_s(n, a, Path(d), env))
    for (impl, n), rs in rates.items():
        rate, one = statistics.median(rs), statistics.median(rates[(impl, procs[0])]) / procs[0]
        res.add(impl=impl, processes=n, tokens_per_s=rate, per_process=rate / n, efficiency=rate / (n * one))
    res.table(["impl", "processes", "tokens_per_s", "per_process", "efficiency"])
    print(f"saved {res.save()} and {res.plot(x='processes', y='efficiency', series='impl', hline=1.0)}")


if __name__ == "__main__":
    main()
