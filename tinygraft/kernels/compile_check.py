"""Every Triton kernel compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200), on a machine with no GPU.

    python -m tinygraft.kernels.compile_check                 # the default set, both targets, report to bench/results
    python -m tinygraft.kernels.compile_check --full          # every candidate with every flag combination (slow)
    python -m tinygraft.kernels.compile_check --write-configs # rebuild every candidate, rewrite launch_configs.json
    python -m tinygraft.kernels.compile_check --tune          # on a CUDA GPU: time the candidates, commit the fastest

How: the launchers themselves run on meta tensors with Triton's launch intercepted, so every kernel is built with
the very arguments, flags and specialisations a real launch gives it (strides of 1 folded, 16-byte alignment),
and with the candidate list the launcher would autotune over on that target. Each candidate is then compiled with
`JITFunction.warmup` against a stand-in driver that reports the target (`triton.compile` with a `GPUTarget`
underneath; ptxas ships in the Triton wheel), and its cubin is read with the wheel's `cuobjdump`:

    regs    registers per thread                    spill   stack bytes per thread (ptxas' spill stores)
    smem    shared memory per block (static + dynamic) against the target's opt-in limit (163 KB, 227 KB)
    wgmma   sm_90 builds of kernels with a tl.dot: whether the PTX uses Hopper's warpgroup MMA

The default set compiles every candidate of every kernel and shape class (head dim 64/128, 16-bit/fp32) under its
heaviest flags (causal, padding, dropout, grouped-query heads, bias: the first row of each case in
compile_cases.py; a launch whose flags are a subset of another's in that row gets one candidate), plus builds that
give every other value of every flag, dtype and head dim at least once (one candidate each, in turn). It fails on
a compile error, on a candidate that spills more than 256 bytes, and on one that needs more shared memory than the
target has — unless launch_configs.json prunes it there (`--write-configs` does so for the Triton it runs under),
in which case it is reported as pruned and not built. Smaller spills are reported, not failed on. About 2.5 minutes
per Triton version on 2 cores.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones: before Triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud (it warns otherwise)

import torch  # noqa: E402

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError:
    print("the compile check builds with Triton, which is not installed here: pip install triton", file=sys.stderr)
    sys.exit(2)

from tinygraft.kernels import launch  # noqa: E402

# Shared memory a block may opt into: 163 KB on the A100, 227 KB on the H100 (CUDA C programming guide, compute
# capabilities table).
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
SPILL_LIMIT = 256
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "compile"


# ---------------------------------------------------------------------------------------------------- capture
@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: the function, its arguments and flags, its candidate configs."""

    kernel: str  # "attention.fwd"
    shape_class: str  # "d128-16bit"
    fn: JITFunction
    args: tuple
    flags: dict  # constexpr keyword arguments the launcher passed, block sizes excluded
    configs: list  # the candidates it autotunes over there, or the one fixed config
    autotuned: bool


class _Capture:
    """Within the block, launches are recorded instead of run: autotuned ones with their candidate lists."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __enter__(self):
        self._auto, self._jit = Autotuner.run, JITFunction.run
        capture = self

        def auto(tuner, *args, **kwargs):
            kwargs.pop("grid", None), kwargs.pop("warmup", None)
            capture.launches.append((tuner.fn, args, kwargs, list(tuner.configs), True))

        def jit(fn, *args, grid, warmup, **kwargs):
            blocks = {k: kwargs.pop(k) for k in list(kwargs) if k.isupper() and k.startswith("BLOCK")}
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            cfg = triton.Config(blocks, **options)
            capture.launches.append((fn, args, kwargs, [cfg], False))

        Autotuner.run, JITFunction.run = auto, jit
        return self

    def __exit__(self, *exc):
        Autotuner.run, JITFunction.run = self._auto, self._jit


def capture(call: Callable[[], None], target: str) -> list[tuple]:
    """The launches `call` makes on meta tensors, with the candidate lists of `target`, autotuning forced (so the
    lists are seen, not a committed pick)."""
    launch._target_override.append(target)
    try:
        with _autotuning(), _Capture() as c:
            call()
        return c.launches
    finally:
        launch._target_override.pop()


@contextlib.contextmanager
def _autotuning():
    """TINYGRAFT_AUTOTUNE=1 within the block (the launchers hand out their autotuners, not a committed pick), with
    the launchers' cache of kernels cleared on the way in and out."""
    saved = os.environ.get("TINYGRAFT_AUTOTUNE")
    os.environ["TINYGRAFT_AUTOTUNE"] = "1"
    launch._autotuned.cache_clear()
    try:
        yield
    finally:
        launch._autotuned.cache_clear()
        if saved is None:
            os.environ.pop("TINYGRAFT_AUTOTUNE")
        else:
            os.environ["TINYGRAFT_AUTOTUNE"] = saved


# ---------------------------------------------------------------------------------------------------- compile
class _TargetDriver:
    """The active driver Triton asks for a target while compiling: the GPU named, no GPU needed."""

    def __init__(self, cap: int):
        self.cap = cap

    def get_current_target(self):
        return GPUTarget("cuda", self.cap, 32)

    def get_current_device(self):
        return self.cap  # a device id per target: Triton caches its compiler per device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def _targeting(cap: int):
    previous = driver._active
    driver.set_active(_TargetDriver(cap))
    try:
        yield
    finally:
        driver._active = previous


def resources(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes per thread, static shared memory, from the cubin's resource table."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


@dataclasses.dataclass
class Result:
    kernel: str
    shape_class: str
    target: str
    config: str
    flags: str
    status: str  # "ok", "spills" (within the limit), "fail" (past a limit), "error" (did not compile), "pruned"
    regs: int | None = None
    spill: int | None = None
    smem: int | None = None
    smem_limit: int | None = None
    wgmma: bool | None = None
    seconds: float = 0.0
    reason: str = ""


def flags_text(flags: dict) -> str:
    """The constexpr flags of a build, short: the names of those on, then the values of the others."""
    on = [k for k, v in sorted(flags.items()) if v is True]
    rest = [f"{k}={_short(v)}" for k, v in sorted(flags.items()) if not isinstance(v, bool)]
    return " ".join(on + rest)


def _short(v) -> str:
    return str(v).removeprefix("triton.language.").removeprefix("tl.")


def judge(regs: int, spill: int, smem: int, smem_limit: int) -> tuple[str, str]:
    """The verdict on one build: fail past the spill or shared-memory limit, note a smaller spill."""
    if smem > smem_limit:
        return "fail", f"needs {smem // 1024} KB of shared memory, the target has {smem_limit // 1024} KB"
    if spill > SPILL_LIMIT:
        return "fail", f"spills {spill} bytes per thread (limit {SPILL_LIMIT})"
    if spill:
        return "spills", f"spills {spill} bytes per thread"
    return "ok", ""


_JOBS: list[tuple] = []  # the plan, inherited by forked workers (JIT functions and meta tensors do not pickle)


def _build_at(i: int) -> Result:
    return build(_JOBS[i])


def build(job: tuple) -> Result:
    """Compile one (launch, config, target) and judge it. Runs in a worker process."""
    kernel, shape_class, fn, args, flags, cfg, target = job
    cap, smem_limit = TARGETS[target]
    flag_text = flags_text(flags)
    base = Result(kernel, shape_class, target, launch.config_key(cfg), flag_text, "fail", smem_limit=smem_limit)
    start = time.perf_counter()
    try:
        with _targeting(cap):
            compiled = fn.warmup(*args, grid=(1,), **flags, **cfg.all_kwargs())
    except Exception as e:  # a compile error is a result to report, not a crash of the check
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # where, then what
        return dataclasses.replace(base, status="error", reason=f"compile error: {first[:200]}",
                                   seconds=time.perf_counter() - start)  # fmt: skip
    use = resources(compiled.asm["cubin"])
    smem = use.get("SHARED", 0) + int(compiled.metadata.shared)
    spill = use.get("STACK", 0) + use.get("LOCAL", 0)
    dots = "tt.dot" in compiled.asm["ttir"]
    wgmma = ("wgmma.mma_async" in compiled.asm["ptx"]) if cap >= 90 and dots else None
    status, reason = judge(use.get("REG", 0), spill, smem, smem_limit)
    return dataclasses.replace(
        base, status=status, reason=reason, regs=use.get("REG"), spill=spill, smem=smem, wgmma=wgmma,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- what
def coverage(dims: dict[str, list], full: bool) -> list[dict]:
    """Rows of flag values: the first row takes every dimension's first value (its heaviest, by convention), and
    the rows after it give every other value at least once (or, `full`, the whole product)."""
    if full:
        return [dict(zip(dims, values)) for values in itertools.product(*dims.values())]
    n = max(len(v) for v in dims.values())
    return [{k: v[i % len(v)] for k, v in dims.items()} for i in range(n)]


def jobs_for(launches_by_row: list[list[tuple]], target: str, full: bool) -> list[tuple]:
    """Every candidate of a kernel and class in the first row that reaches it (its heaviest: the largest head dim
    and every flag on); the rows after it with one candidate each, in turn (all of them, if `full`)."""
    jobs, seen, first_row = [], set(), {}
    for i, launches in enumerate(launches_by_row):
        for kernel, shape_class, fn, args, flags, configs in launches:
            first = first_row.setdefault((kernel, shape_class), i) == i
            rivals = [f for k, c, _, _, f, _ in launches if (k, c) == (kernel, shape_class) and f != flags]
            heaviest = first and not any(dominates(f, flags) for f in rivals)
            picked = configs if (heaviest or full) else [configs[i % len(configs)]]
            for cfg in picked:
                key = (kernel, shape_class, launch.config_key(cfg), tuple(sorted(flags.items())), target)
                if key not in seen:
                    seen.add(key)
                    jobs.append((kernel, shape_class, fn, args, flags, cfg, target))
    return jobs


def dominates(a: dict, b: dict) -> bool:
    """Whether flags `a` switch on everything `b` does, with the same values otherwise: a build of `b` then needs
    no more than `a`'s registers and shared memory, so one candidate of it is enough."""
    if a.keys() != b.keys():
        return False
    return all((a[k] or not b[k]) if isinstance(b[k], bool) else a[k] == b[k] for k in b)


def plan(full: bool, only: str | None = None, rebuild: bool = False) -> tuple[list[tuple], list[Result]]:
    """The builds to run and the pruned candidates to report, for both targets. `rebuild`: every candidate, the
    pruned ones too (to rewrite launch_configs.json)."""
    from tinygraft.kernels import compile_cases  # noqa: PLC0415 (needs the interpreter flag cleared first)

    jobs, pruned = [], []
    launch._ignore_pruned.append(rebuild)
    try:
        for case in compile_cases.CASES:
            if only and not case.kernel_prefix.startswith(only):
                continue
            for target in TARGETS:
                by_row = []
                for row in coverage(case.dims, full):
                    launches = []
                    for fn, args, flags, configs, _ in capture(lambda c=case, row=row: c.call(**row), target):
                        kernel = f"{case.kernel_prefix}.{compile_cases.kernel_name(fn)}"
                        launches.append((kernel, case.shape_class(**row), fn, args, flags, configs))
                    by_row.append(launches)
                jobs += jobs_for(by_row, target, full)
                pruned += [] if rebuild else _pruned(by_row, target)
    finally:
        launch._ignore_pruned.pop()
    return jobs, pruned


def _pruned(by_row, target) -> list[Result]:
    out, seen = [], set()
    for launches in by_row:
        for kernel, shape_class, *_ in launches:
            for name in sorted(launch.pruned(kernel, shape_class, target)):
                if (kernel, shape_class, name) not in seen:
                    seen.add((kernel, shape_class, name))
                    out.append(Result(kernel, shape_class, target, name, "", "pruned", reason="pruned for this target"))
    return out


# ---------------------------------------------------------------------------------------------------- report
def table(results: list[Result]) -> str:
    lines = [
        "| kernel | class | target | config | flags | regs | spill B | smem KB | wgmma | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.kernel, r.shape_class, r.target, r.status == "pruned", r.config)):
        smem = f"{r.smem / 1024:.0f}/{r.smem_limit // 1024}" if r.smem is not None else ""
        wg = {True: "yes", False: "no", None: ""}[r.wgmma]
        status = r.status + (f": {r.reason}" if r.reason and r.status != "ok" else "")
        regs, spill = ("" if r.regs is None else r.regs), ("" if r.spill is None else r.spill)
        lines.append(f"| {r.kernel} | {r.shape_class} | {r.target} | {r.config} | {r.flags} | {regs} | {spill} | "
                     f"{smem} | {wg} | "
                     f"{status} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def merged_configs(results: list[Result], order: dict, existing: dict, version: str) -> dict:
    """launch_configs.json after this run: per target, kernel and class with a choice to make (two candidates or
    more, or one past a limit), this Triton version's pruned candidates (those past a limit) beside other versions'
    entries, and the chosen config: a `--tune` pick that is still not pruned, else the first candidate no version
    prunes, in the launcher's order of preference."""
    out = json.loads(json.dumps(existing))
    keyed = lambda r: (r.target, r.kernel, r.shape_class)  # noqa: E731
    for (target, kernel, shape_class), rs in itertools.groupby(sorted(results, key=keyed), key=keyed):
        rs = list(rs)
        failed = sorted({r.config for r in rs if r.status == "fail"})
        known = out.get(target, {}).get(kernel, {}).get(shape_class)
        if len(order.get((kernel, shape_class, target), [])) < 2 and not failed and known is None:
            continue  # one candidate that builds (a fixed launch, or a list of one): nothing to choose or prune
        node = out.setdefault(target, {}).setdefault(kernel, {}).setdefault(shape_class, {})
        by_version = node.setdefault("pruned", {})
        by_version[version] = failed
        bad = {name for names in by_version.values() for name in names} | {r.config for r in rs if r.status == "error"}
        good = [c for c in order.get((kernel, shape_class, target), []) if c not in bad]
        if not (node.get("tuned_on") and node.get("chosen") in good):
            node.pop("tuned_on", None)
            node["chosen"] = good[0] if good else None
    return out


def run(full: bool, only: str | None, workers: int, write_configs: bool, out_dir: Path) -> int:
    start = time.perf_counter()
    jobs, pruned = plan(full, only, rebuild=write_configs)
    order = {}
    for kernel, shape_class, _, _, _, cfg, target in jobs:
        names = order.setdefault((kernel, shape_class, target), [])
        if launch.config_key(cfg) not in names:
            names.append(launch.config_key(cfg))
    print(f"compiling {len(jobs)} kernel builds for {', '.join(TARGETS)} with Triton {triton.__version__} "
          f"({workers} workers)", file=sys.stderr, flush=True)  # fmt: skip
    results = []
    _JOBS[:] = jobs
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for i, r in enumerate(pool.imap(_build_at, range(len(jobs)))):
            results.append(r)
            if r.status in ("fail", "error") or (i + 1) % 25 == 0 or i + 1 == len(jobs):
                note = f"{r.status} {r.reason}".strip()
                print(f"  [{i + 1}/{len(jobs)}] {r.kernel} {r.shape_class} {r.target} {r.config}: {note}",
                      file=sys.stderr, flush=True)  # fmt: skip
    results += pruned
    elapsed = time.perf_counter() - start
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "spills", "fail", "error", "pruned")}
    summary = (f"{len(jobs)} builds: {counts['ok']} ok, {counts['spills']} with small spills (<= {SPILL_LIMIT} B), "
               f"{counts['fail']} past a limit, {counts['error']} compile errors; {counts['pruned']} candidates pruned "
               f"by launch_configs.json, not built; {elapsed:.0f} s on {workers} workers")  # fmt: skip
    write_report(results, summary, full, only, elapsed, out_dir)
    problems = [r for r in results if r.status == "error"]
    if write_configs:
        merged = merged_configs(results, order, launch.committed(), triton.__version__)
        launch.CONFIG_FILE.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        launch._read.cache_clear()
        print(f"wrote {launch.CONFIG_FILE}", file=sys.stderr)
        for target, kernels in merged.items():
            for kernel, classes in kernels.items():
                for shape_class, node in classes.items():
                    if node["chosen"] is None:
                        print(f"FAILED {kernel} {shape_class} {target}: every candidate is pruned", file=sys.stderr)
                        problems.append(node)
    else:
        problems += [r for r in results if r.status == "fail"]
    print(summary, file=sys.stderr)
    for r in problems:
        if isinstance(r, Result):
            print(f"FAILED {r.kernel} {r.shape_class} {r.target} {r.config} [{r.flags}]: {r.reason}", file=sys.stderr)
    if any(isinstance(r, Result) and r.status == "fail" for r in problems):
        print("prune those with --write-configs, or change the candidate lists", file=sys.stderr)
    return 1 if problems else 0


def write_report(results: list[Result], summary: str, full: bool, only, elapsed: float, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"triton-{triton.__version__}" + ("-full" if full else "") + (f"-{only}" if only else "")
    report = {"triton": triton.__version__, "torch": torch.__version__, "seconds": round(elapsed, 1),
              "spill_limit": SPILL_LIMIT, "targets": {t: {"smem_limit": m} for t, (_, m) in TARGETS.items()},
              "results": [dataclasses.asdict(r) for r in results]}  # fmt: skip
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    command = "python -m tinygraft.kernels.compile_check" + (" --full" if full else "") + (f" --only {only}" if only
                                                                                             else "")  # fmt: skip
    (out_dir / f"{stem}.md").write_text(f"# Compile check, Triton {triton.__version__}\n\n`{command}`: {summary}.\n\n"
                                        f"{table(results)}", encoding="utf-8")  # fmt: skip
    print(f"report: {out_dir / stem}.md", file=sys.stderr)


def tune(only: str | None) -> int:
    """On this CUDA GPU: autotune every kernel and class on each case's heaviest row (real tensors of the cases'
    training shapes) and commit the winners as `chosen` for this GPU's target in launch_configs.json."""
    from tinygraft.kernels import compile_cases  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("--tune times kernels on a CUDA GPU and this machine has none; the compile check itself needs no GPU",
              file=sys.stderr)  # fmt: skip
        return 2
    target = launch.current_target()
    winners: dict = {}
    current: list = []
    real_run = Autotuner.run

    def timed(tuner, *args, **kwargs):
        out = real_run(tuner, *args, **kwargs)
        kernel = f"{current[0]}.{compile_cases.kernel_name(tuner.fn)}"
        winners[kernel, current[1]] = launch.config_key(tuner.best_config)
        return out

    compile_cases.DEVICE.append(torch.device("cuda"))
    Autotuner.run = timed
    try:
        with _autotuning():
            for case in compile_cases.CASES:
                if only and not case.kernel_prefix.startswith(only):
                    continue
                row = coverage(case.dims, False)[0]
                current[:] = [case.kernel_prefix, case.shape_class(**row)]
                case.call(**row)
                torch.cuda.synchronize()
    finally:
        Autotuner.run = real_run
        compile_cases.DEVICE.pop()
    merged = json.loads(json.dumps(launch.committed()))
    name = torch.cuda.get_device_name()
    for (kernel, shape_class), config in sorted(winners.items()):
        node = merged.setdefault(target, {}).setdefault(kernel, {}).setdefault(shape_class, {})
        node.update(chosen=config, tuned_on=name)
        print(f"{target} {kernel} {shape_class}: {config}", file=sys.stderr)
    launch.CONFIG_FILE.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    launch._read.cache_clear()
    print(f"wrote {len(winners)} tuned choices for {target} ({name}) to {launch.CONFIG_FILE}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygraft.kernels.compile_check", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--full", action="store_true", help="every candidate with every flag combination (slow)")
    parser.add_argument("--only", help="kernels whose name starts with this (attention, lora, bias_gelu, adamw)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--write-configs", action="store_true", help="rewrite kernels/launch_configs.json")
    parser.add_argument("--tune", action="store_true", help="on a CUDA GPU: autotune, commit the fastest configs")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"report directory (default {RESULTS})")
    a = parser.parse_args(argv)
    if a.tune:
        return tune(a.only)
    if not CUOBJDUMP.is_file():
        print(f"the compile check reads cubins with the cuobjdump Triton's wheel ships, not found at {CUOBJDUMP}",
              file=sys.stderr)  # fmt: skip
        return 2
    if a.workers < 1:
        print(f"--workers must be at least 1, got {a.workers}", file=sys.stderr)
        return 2
    return run(a.full, a.only, a.workers, a.write_configs, a.out)


if __name__ == "__main__":
    sys.exit(main())
