"""Run by test_compile_check.py in a fresh process (Triton compiled, not interpreted): builds four small kernels
the compile check must judge (one that fits, one that spills, one past the shared memory, one that does not
compile), then the check's whole run on them, and prints the results as JSON on stdout.

    python tests/kernels/compile_failures.py OUT_DIR      (TRITON_INTERPRET unset: the builds are real ones)
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from tinygraft.kernels import compile_check, launch


@triton.jit
def fits(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs) * 2.0)


@triton.jit
def spills(X, Y, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) fp32 tile live at once in one warp: far more values than 255 registers per thread hold."""
    rows, cols = tl.arange(0, ROWS), tl.arange(0, COLS)
    x = tl.load(X + rows[:, None] * COLS + cols[None, :])
    y = tl.exp(x) * tl.sum(x, axis=0)[None, :] + tl.sum(x * x, axis=1)[:, None]
    tl.store(Y + rows[:, None] * COLS + cols[None, :], y)


@triton.jit
def big_dot(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """One (M, K) x (K, N) fp16 dot, pipelined over 8 K-steps: its staged operands pass any target's shared memory."""
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for k in tl.range(0, 8 * K, K, num_stages=4):
        a = tl.load(A + rm[:, None] * (8 * K) + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def broken(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.dot(tl.load(X + offs), tl.load(X + offs)))  # a dot of two vectors: not a matmul


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def jobs() -> list[tuple]:
    x, y = _meta(4096), _meta(4096)
    rows, cols = 64, 256
    a, b, c = _meta(256, 8 * 128, dtype=torch.float16), _meta(8 * 128, 256, dtype=torch.float16), _meta(256, 256)
    cases = [
        ("test.fits", fits, (x, y), triton.Config({"BLOCK": 1024}, num_warps=4)),
        ("test.spills", spills, (_meta(rows * cols), _meta(rows * cols)),
         triton.Config({"ROWS": rows, "COLS": cols}, num_warps=1)),
        ("test.big_dot", big_dot, (a, b, c), triton.Config({"M": 256, "N": 256, "K": 128}, num_warps=8)),
        ("test.broken", broken, (x, y), triton.Config({"BLOCK": 64}, num_warps=4)),
    ]  # fmt: skip
    return [
        (name, "all", fn, args, {}, cfg, target) for name, fn, args, cfg in cases for target in compile_check.TARGETS
    ]


def main(out_dir: Path) -> None:
    built = [dataclasses.asdict(compile_check.build(job)) for job in jobs()]
    # The whole run on these jobs: its exit code, its report, and the configs file it writes.
    compile_check.plan = lambda full, only=None, rebuild=False: (jobs(), [])
    launch.CONFIG_FILE = out_dir / "launch_configs.json"
    code = compile_check.run(False, None, 2, False, out_dir)
    code_written = compile_check.run(False, None, 2, True, out_dir)
    print(json.dumps({"built": built, "code": code, "code_written": code_written,
                      "configs": json.loads(launch.CONFIG_FILE.read_text())}))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
