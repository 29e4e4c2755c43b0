"""The one benchmark harness every bench/ script uses (README: Benchmarks).

    from bench.common import Results, bench_device, copy_bandwidth, peak_memory_mb, time_fn

    dev = bench_device()
    res = Results("adamw", dev)                           # device name, library versions, backend line
    ceiling = copy_bandwidth(dev)                         # GB/s, bytes read + bytes written, measured now
    t = time_fn(step, inputs=[(a,), (b,)], device=dev)    # warm-up, then median/p20/p80 of timed repeats
    res.add(size="124M", impl="tinygraft", ms=t.median_ms, gbps=nbytes / t.median_ms / 1e6)
    res.table(["size", "impl", "ms", "gbps"])             # prints an aligned table
    res.save(); res.plot(x="size", y="gbps", series="impl", ylabel="GB/s", hline=ceiling)

Timing: CUDA events around each call on a GPU, perf_counter around each call (after the work is done) on a CPU.
So the cache does not flatter a small op, each call gets the next input set of `inputs` (rotating) and, on CUDA,
a write to a buffer twice the largest L2 of current GPUs (256 MB) before each timed call (outside the events).

Results schema, one file per benchmark at bench/results/<device-slug>/<bench>.json ("cpu" on a CPU; the folder is
$BENCH_RESULTS_DIR when that is set):
    {"bench": str, "device": str, "versions": {"python", "torch", "triton", "numpy", "cuda"}, "backend": str,
     "cpu_features": [the CPU's avx2 / avx512f / avx512_bf16 / amx_* flags], "precision_auto": what train.precision
     auto means here, "notes": {...}, "rows": [{column: value, ...}, ...]}
"""

import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from tinygraft.core import precision
from tinygraft.kernels.backend import describe

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_L2_FLUSH_BYTES = 256 * 2**20


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU model, for the record; the results directory is just "cpu"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    return "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides a CPU's matmul rates


def cpu_features() -> list[str]:
    """Which of CPU_FEATURES the processor has (recorded beside every figure: bf16 speed depends on them)."""
    flags = precision.cpu_flags()
    return [f for f in CPU_FEATURES if f in flags]


def versions() -> dict:
    try:
        import triton  # noqa: PLC0415 (Triton is there only where a GPU is)

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def time_fn(fn, inputs=None, device=None, warmup=3, repeats=None, budget_s=1.0, flush=None) -> Timing:
    """Time `fn(*inputs[i % len(inputs)])` (or `fn()` when inputs is None).

    repeats defaults to what fits in about `budget_s` (at least 5, at most 200) after `warmup` calls.
    flush (default: on CUDA only) writes 256 MB before every timed call so nothing is left in L2.
    """
    device = device or bench_device()
    flush = device.type == "cuda" if flush is None else flush
    sets = inputs if inputs else [()]
    scratch = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device) if flush else None
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    _sync(device)
    if repeats is None:
        t0 = time.perf_counter()
        fn(*sets[0])
        _sync(device)
        repeats = int(min(200, max(5, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for i in range(repeats):
        args = sets[i % len(sets)]
        if scratch is not None:
            scratch.zero_()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(times), q[1], q[7], repeats)


def copy_bandwidth(device=None, nbytes=None) -> float:
    """Achieved GB/s of `dst.copy_(src)`, counting bytes read plus bytes written: the ceiling for a streaming op.

    1 GiB on CUDA (far beyond L2), 256 MiB on a CPU (beyond its last-level cache).
    """
    device = device or bench_device()
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(dst.copy_, inputs=[(src,)], device=device, warmup=2, flush=False, budget_s=0.5)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


_PEAKS: dict = {}


def matmul_peak_gflops(device=None, dtype=torch.float32) -> float:
    """The machine's achieved dense matmul rate in GFLOP/s for `dtype`, measured once per process and device: the
    ceiling a training benchmark's model FLOP rate is held against (the median of about a second of repeats).

    Square operands of up to 8192 on CUDA and 2048 on a CPU, beyond the caches; but the size stops doubling once one
    multiply takes 0.1 s, since a CPU without native bf16 emulates it (2048 took a minute on a 2-core EPYC).
    """
    device = device or bench_device()
    key = (str(device), dtype)
    if key not in _PEAKS:
        cap, n = (8192 if device.type == "cuda" else 2048), 256
        while True:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            a @ b  # the first call pays for library start-up (cuBLAS handles), not for the multiply
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            if n >= cap or time.perf_counter() - t0 > 0.1:
                break
            n *= 2
        t = time_fn(lambda: a @ b, device=device, warmup=3, budget_s=1.0, flush=False)
        _PEAKS[key] = 2 * n**3 / (t.median_ms * 1e-3) / 1e9
    return _PEAKS[key]


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters a token multiplies through: the 2-D weights of Linear (and Conv1D-style) layers, each once; an
    embedding table counts only where it is also the output head (tied), since a lookup costs no FLOPs."""
    seen, n = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and p.dim() == 2 and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def model_flops_per_token(matmul_n: int, n_layer: int, d_model: int, seq: float) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward 2N, backward 4N) plus 12 L d T for attention's
    scores and values (PaLM, appendix B: 6N + 12 L H Q T, with H Q = d)."""
    return 6 * matmul_n + 12 * n_layer * d_model * seq


def flop_rate(row: dict, flops_per_token: float, tokens_per_s: float, peak_gflops: float) -> dict:
    """The row's model FLOP rate (GFLOP/s) and its share of the measured matmul peak of its precision."""
    gflops = flops_per_token * tokens_per_s / 1e9
    row.update(model_gflops=gflops, of_peak=gflops / peak_gflops, peak_gflops=peak_gflops)
    return row


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def peak_memory_mb(fn, device=None) -> float:
    """Peak memory that running `fn()` adds, in MB (2**20 bytes).

    CUDA: torch.cuda.max_memory_allocated after a reset, minus what was allocated before (the caching allocator's
    own view; reserved-but-free memory is not counted). CPU: the process's peak resident set (VmHWM) after
    resetting it through /proc/self/clear_refs (Linux), minus the RSS before; it counts every allocation (numpy,
    Python objects, allocator slack), so it is an upper bound on the tensors' own bytes. Where the peak cannot be
    reset, ru_maxrss (the whole process lifetime's peak) is used, a coarser upper bound.
    """
    device = device or bench_device()
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS to the current RSS
        reset = True
    except OSError:
        reset = False
    fn()
    peak = _rss_mb("VmHWM") if reset else None
    if peak is not None and before is not None:
        return peak - before
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # ru_maxrss: bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - (before or 0.0)


class Results:
    """Rows of one benchmark, with the device and versions they were measured on."""

    def __init__(self, bench: str, device=None, notes: dict | None = None):
        self.device = device or bench_device()
        self.data = {
            "bench": bench,
            "device": device_name(self.device),
            "versions": versions(),
            "backend": describe(),
            "cpu_features": cpu_features(),
            "precision_auto": precision.resolve("auto", self.device).line,
            "notes": dict(notes or {}),
            "rows": [],
        }
        self.rows = self.data["rows"]
        # bench/gpu.sh points every stage at one folder ($OUT on a lent machine) with BENCH_RESULTS_DIR
        override = os.environ.get("BENCH_RESULTS_DIR")
        self.dir = Path(override) if override else RESULTS_DIR / device_slug(self.device)

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    def table(self, columns: list[str] | None = None) -> str:
        """Print (and return) the rows as an aligned text table; floats to 4 significant digits."""
        columns = columns or (list(self.rows[0]) if self.rows else [])
        cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        grid = [columns] + [[cell(r.get(c, "")) for c in columns] for r in self.rows]
        widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in grid]
        lines.insert(1, "  ".join("-" * w for w in widths))
        title = f"{self.data['bench']} on {self.data['device']} (backend: {self.data['backend']})"
        text = "\n".join([title] + lines)
        print(text)
        return text

    def save(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.data['bench']}.json"
        path.write_text(json.dumps(self.data, indent=1) + "\n")
        return path

    def plot(self, x: str, y: str, series: str, ylabel: str = "", hline: float | None = None, name=None) -> Path:
        """Grouped bars of y per x value, one bar per series value; an optional dashed ceiling line."""
        import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

        xs = list(dict.fromkeys(r[x] for r in self.rows))
        ss = list(dict.fromkeys(r[series] for r in self.rows))
        width = 0.8 / len(ss)
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(xs) * len(ss) / 2), 4))
        for j, s in enumerate(ss):
            vals = {r[x]: r[y] for r in self.rows if r[series] == s}
            ax.bar([i + j * width for i in range(len(xs))], [vals.get(v, 0) for v in xs], width, label=str(s))
        if hline is not None:
            ax.axhline(hline, color="k", linestyle="--", linewidth=1, label=f"ceiling {hline:.3g}")
        ax.set_xticks([i + width * (len(ss) - 1) / 2 for i in range(len(xs))], [str(v) for v in xs])
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or y)
        ax.set_title(f"{self.data['bench']}: {self.data['device']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name or self.data['bench']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
