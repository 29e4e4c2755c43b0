"""Which precision a training step runs in: `train.precision = auto | fp32 | bf16`.

bf16 here means autocast: matmuls (and the attention built on them) run in bf16, while the master weights, the
optimizer state, the gradients the optimizer sees and the loss stay fp32, so a run's checkpoints are the same
whatever the precision, and a bf16 run resumes in fp32 or the other way round.

`auto` picks bf16 where the hardware multiplies bf16 natively and fp32 elsewhere:
    CUDA                 bf16 (as tinygraft always ran there)
    a CPU with AMX or    bf16: oneDNN's bf16 GEMMs use AMX tiles or AVX512-BF16's dot products, 2-7x the fp32 rate
    AVX512-BF16          (a 2048-square matmul on a 2-core AMX Xeon: 316 GFLOP/s fp32, 2,215 bf16)
    any other CPU        fp32: bf16 there is emulated through fp32 and only adds conversions
`bf16` asked for on a CPU without native support is honoured (the user may want its numerics) and said to be slow.
TINYGRAFT_CPU_BF16=0 (or 1) overrides the detection: the test suite sets 0, so `auto` means fp32 in every test
whatever CPU runs it, and a test that wants bf16 asks for it.
"""

import contextlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tinygraft.errors import TinygraftError

PRECISIONS = ("auto", "fp32", "bf16")
HELP = ("bf16 autocast or fp32; auto: bf16 on CUDA and on a CPU with native bf16 (AMX, AVX512-BF16), fp32 elsewhere; "
        "weights and optimizer state stay fp32")  # fmt: skip
# /proc/cpuinfo flag -> how the run's first line names it, best first
_CPU_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo (or in `cpuinfo`); empty where there is none."""
    if cpuinfo is None:
        if platform.system() != "Linux":
            return set()
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    line = next((x for x in cpuinfo.splitlines() if x.startswith("flags") and ":" in x), "")
    return set(line.split(":", 1)[1].split()) if line else set()


def cpu_bf16() -> str | None:
    """The CPU's native bf16 matmul support ('AMX', 'AVX512-BF16'), or None (none, or not Linux on x86)."""
    forced = os.environ.get("TINYGRAFT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return "TINYGRAFT_CPU_BF16=1" if forced == "1" else None
    flags = cpu_flags()
    return next((name for flag, name in _CPU_FLAGS if flag in flags), None)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast's dtype, or None: plain fp32
    line: str  # for the run's first line and `info`

    @property
    def name(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"


def resolve(requested: str, device: torch.device) -> Precision:
    """What `train.precision` means on `device`, with the reason in words."""
    if requested not in PRECISIONS:
        raise TinygraftError(f"train.precision {requested!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if requested == "fp32":
            return Precision(None, "fp32 (asked for)")
        return Precision(torch.bfloat16, f"bf16 autocast ({'auto on CUDA' if requested == 'auto' else 'asked for'})")
    if device.type != "cpu":
        if requested == "bf16":
            raise TinygraftError(f"train.precision bf16 runs on CUDA or a CPU; the device is {device.type}")
        return Precision(None, f"fp32 (on {device.type})")
    native = cpu_bf16()
    if requested == "fp32":
        return Precision(None, "fp32 (asked for)")
    if requested == "bf16":
        how = f"the CPU has {native}" if native else "emulated: this CPU has no native bf16, expect it slower than fp32"
        return Precision(torch.bfloat16, f"bf16 autocast ({how})")
    if native:
        return Precision(torch.bfloat16, f"bf16 autocast (auto: the CPU has {native})")
    return Precision(None, "fp32 (auto: the CPU has no native bf16, neither AMX nor AVX512-BF16)")


def autocast(device: torch.device, precision: Precision) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context every forward pass runs in (a fresh one per use)."""
    if precision.dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=precision.dtype)
