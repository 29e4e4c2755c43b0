"""Which block shapes a Triton kernel launches with on a GPU: the committed choice for its target, or autotuning.

Each autotuned kernel keeps its candidate list beside its launcher (in the order it prefers them). The compile
check (`python -m tinygraft.kernels.compile_check`, no GPU needed) compiles every candidate for sm_80 and sm_90 and
writes `launch_configs.json` beside this file:

    {"sm_90": {"attention.fwd": {"d128-16bit": {"pruned": {"3.6.0": ["BLOCK_M=128,BLOCK_N=32,warps=4,stages=3"],
                                                           "3.9.0": [...]},
                                                "chosen": "BLOCK_M=128,BLOCK_N=64,warps=8,stages=3"}, ...}, ...}}

`pruned` are, per Triton version the check ran under, the candidates that spill more than it allows or need more
shared memory than the target has: the launcher never tries them there (under any version: a config one Triton
cannot build well is not worth a try on another). `chosen` is the first surviving candidate, or the fastest where
`--tune` ran on that GPU: the launcher runs it directly, so a lent GPU starts without a cold autotune.
`TINYGRAFT_AUTOTUNE=1` autotunes over the surviving candidates instead. A target with no entry (sm_89, sm_100, ...)
autotunes over them all.
"""

import functools
import json
import os
from pathlib import Path

import torch
import triton

CONFIG_FILE = Path(__file__).with_name("launch_configs.json")
_target_override: list[str] = []  # set by the compile check, which launches for targets it does not run on
_ignore_pruned: list[bool] = []  # set by the compile check when it rebuilds every candidate to rewrite the file


def config_key(cfg: triton.Config) -> str:
    """A config by name: its block sizes, warps and stages ("BLOCK_M=128,BLOCK_N=64,warps=8,stages=3")."""
    blocks = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{blocks},warps={cfg.num_warps},stages={cfg.num_stages}"


def current_target() -> str | None:
    """'sm_90' for the current CUDA device (or the target the compile check is building for); None without one."""
    if _target_override:
        return _target_override[-1]
    if not torch.cuda.is_available():
        return None
    return _cuda_target(torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def autotune_forced() -> bool:
    return os.environ.get("TINYGRAFT_AUTOTUNE", "") == "1"


def committed() -> dict:
    """launch_configs.json as committed ({} when there is none)."""
    return _read(CONFIG_FILE)


@functools.cache
def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def entry(kernel: str, shape_class: str, target: str | None = None) -> dict:
    target = target or current_target()
    return committed().get(target or "", {}).get(kernel, {}).get(shape_class, {})


def pruned(kernel: str, shape_class: str, target: str | None = None) -> set[str]:
    """The candidates pruned on `target` (default: the current one) under any Triton version."""
    if _ignore_pruned and _ignore_pruned[-1]:
        return set()
    by_version = entry(kernel, shape_class, target).get("pruned", {})
    return {name for names in by_version.values() for name in names}


def candidates(kernel: str, shape_class: str, configs: list[triton.Config]) -> list[triton.Config]:
    """The configs the launcher may try on the current target: the list minus what the check pruned there."""
    out = pruned(kernel, shape_class)
    kept = [c for c in configs if config_key(c) not in out]
    return kept or configs[-1:]  # never empty: the last (smallest) config is the fallback the lists end with


def chosen(kernel: str, shape_class: str, configs: list[triton.Config]) -> triton.Config | None:
    """The committed config to launch directly, or None to autotune (forced, or no choice for this target)."""
    if autotune_forced():
        return None
    name = entry(kernel, shape_class).get("chosen")
    return next((c for c in configs if config_key(c) == name), None)


def autotuned(kernel: str, shape_class: str, fn, configs: list[triton.Config], key: list[str]):
    """(launchable, extra kwargs): the plain kernel with the committed config's kwargs, or an autotuner over the
    surviving candidates. Cached per target, kernel and class."""
    return _autotuned(current_target(), autotune_forced(), kernel, shape_class, fn, tuple(configs), tuple(key))


@functools.cache
def _autotuned(target, forced, kernel, shape_class, fn, configs, key):
    pick = chosen(kernel, shape_class, list(configs))
    if pick is not None:
        return fn, {**pick.kwargs, "num_warps": pick.num_warps, "num_stages": pick.num_stages}
    return triton.autotune(configs=candidates(kernel, shape_class, list(configs)), key=list(key))(fn), {}
