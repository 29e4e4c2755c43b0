"""The compile check (tinygraft/kernels/compile_check.py) and the launch configs it commits (kernels/launch.py).

What it decides is tested here on small inputs; its failure modes on real builds run in a fresh process without the
interpreter (compile_failures.py: a kernel that fits, one that spills, one past the shared memory, one that does
not compile). CI runs the check itself over every kernel under both Tritons.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from tinygraft.kernels import launch

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cc():
    """The check's module, imported in a subprocess-free way: its import clears TRITON_INTERPRET, so restore it."""
    saved = os.environ.get("TRITON_INTERPRET")
    from tinygraft.kernels import compile_check  # noqa: PLC0415 (its import changes the environment)

    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved
    return compile_check


def test_judge_fails_past_either_limit_and_notes_small_spills(cc):
    limit = 163 * 1024
    assert cc.judge(200, 0, limit, limit) == ("ok", "")
    assert cc.judge(255, 100, 1000, limit)[0] == "spills"
    assert cc.judge(255, cc.SPILL_LIMIT, 1000, limit)[0] == "spills"
    status, reason = cc.judge(255, cc.SPILL_LIMIT + 8, 1000, limit)
    assert status == "fail" and "264 bytes" in reason
    status, reason = cc.judge(64, 0, limit + 1, limit)
    assert status == "fail" and "shared memory" in reason and "163 KB" in reason


@pytest.mark.parametrize("dims", [
    {"a": [1, 2, 3], "b": [True, False], "c": ["x"]},
    {"D": [64, 32, 16], "dtype": ["bf16", "fp16"], "causal": [True, False], "pad": [True, False]},
])  # fmt: skip
def test_coverage_gives_every_value_and_the_heaviest_row_first(cc, dims):
    rows = cc.coverage(dims, full=False)
    assert rows[0] == {k: v[0] for k, v in dims.items()}
    for k, values in dims.items():
        assert {row[k] for row in rows} == set(values)
    assert len(rows) == max(len(v) for v in dims.values())
    full = cc.coverage(dims, full=True)
    assert len(full) == len(list(itertools.product(*dims.values()))) and rows[0] in full


def test_dominance_of_flag_sets(cc):
    heavy = {"HAS_BIAS": True, "DROPOUT": True, "BLOCK_R": 16}
    assert cc.dominates(heavy, {"HAS_BIAS": False, "DROPOUT": True, "BLOCK_R": 16})
    assert not cc.dominates({"HAS_BIAS": True, "DROPOUT": False, "BLOCK_R": 16}, heavy)
    assert not cc.dominates(heavy, {**heavy, "BLOCK_R": 32})  # another value: another build
    assert not cc.dominates(heavy, {"HAS_BIAS": True})


def _cfg(m):
    return triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=2)


def test_jobs_build_every_candidate_of_the_heaviest_launch_once(cc):
    configs = [_cfg(128), _cfg(64), _cfg(32)]
    heavy, light, other = {"CAUSAL": True, "PAD": True}, {"CAUSAL": True, "PAD": False}, {"CAUSAL": False, "PAD": True}
    rows = [
        [("k.fwd", "c", None, (), heavy, configs), ("k.fwd", "c", None, (), light, configs)],
        [("k.fwd", "c", None, (), other, configs)],
        [("k.fwd", "c", None, (), heavy, configs)],  # seen already: no second build
    ]
    jobs = cc.jobs_for(rows, "sm_90", full=False)
    built = [(launch.config_key(j[5]), tuple(j[4].values())) for j in jobs]
    assert built[:3] == [(launch.config_key(c), (True, True)) for c in configs]  # every candidate, heaviest flags
    assert len(built) == 5 and len(set(built)) == 5  # the dominated and the later rows: one candidate each
    assert len(cc.jobs_for(rows, "sm_90", full=True)) == 9


def test_merged_configs_keep_each_versions_prunes_and_choose_the_first_survivor(cc):
    names = [launch.config_key(c) for c in (_cfg(128), _cfg(64), _cfg(32))]
    order = {("k.fwd", "c", "sm_90"): names}

    def result(config, status):
        return cc.Result("k.fwd", "c", "sm_90", config, "", status)

    existing = {"sm_90": {"k.fwd": {"c": {"pruned": {"3.6.0": [names[1]]}, "chosen": names[0]}}}}
    merged = cc.merged_configs([result(names[0], "fail"), result(names[1], "ok"), result(names[2], "spills")],
                               order, existing, "3.9.0")  # fmt: skip
    node = merged["sm_90"]["k.fwd"]["c"]
    assert node["pruned"] == {"3.6.0": [names[1]], "3.9.0": [names[0]]}
    assert node["chosen"] == names[2]  # 128 fails under 3.9, 64 under 3.6
    assert existing["sm_90"]["k.fwd"]["c"]["chosen"] == names[0]  # the input is not modified
    tuned = {"sm_90": {"k.fwd": {"c": {"pruned": {}, "chosen": names[1], "tuned_on": "NVIDIA H200"}}}}
    node = cc.merged_configs([result(n, "ok") for n in names], order, tuned, "3.9.0")["sm_90"]["k.fwd"]["c"]
    assert node["chosen"] == names[1] and node["tuned_on"] == "NVIDIA H200"  # a --tune pick that still builds stays


@pytest.fixture
def configs_file(tmp_path, monkeypatch):
    path = tmp_path / "launch_configs.json"
    monkeypatch.setattr(launch, "CONFIG_FILE", path)
    monkeypatch.setattr(launch, "_target_override", ["sm_90"])
    monkeypatch.delenv("TINYGRAFT_AUTOTUNE", raising=False)
    launch._read.cache_clear()
    launch._autotuned.cache_clear()
    yield path
    launch._read.cache_clear()
    launch._autotuned.cache_clear()


def test_launcher_runs_the_committed_choice_or_autotunes_the_survivors(configs_file, monkeypatch):
    configs = [_cfg(128), _cfg(64), _cfg(32)]
    names = [launch.config_key(c) for c in configs]
    configs_file.write_text(json.dumps({"sm_90": {"k.fwd": {"c": {"pruned": {"3.9.0": [names[0]], "3.6.0": []},
                                                                  "chosen": names[1]}}}}))  # fmt: skip

    def kernel():
        pass

    fn, fixed = launch.autotuned("k.fwd", "c", kernel, configs, ["N"])
    assert fn is kernel and fixed == {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2}
    assert [launch.config_key(c) for c in launch.candidates("k.fwd", "c", configs)] == names[1:]
    monkeypatch.setenv("TINYGRAFT_AUTOTUNE", "1")
    assert launch.chosen("k.fwd", "c", configs) is None
    assert launch.candidates("k.fwd", "other class", configs) == configs  # no entry: every candidate
    monkeypatch.setattr(launch, "_target_override", ["sm_100"])
    assert launch.entry("k.fwd", "c") == {} and launch.chosen("k.fwd", "c", configs) is None
    everything_pruned = {"sm_90": {"k.fwd": {"c": {"pruned": {"3.9.0": names}, "chosen": None}}}}
    configs_file.write_text(json.dumps(everything_pruned))
    launch._read.cache_clear()
    monkeypatch.setattr(launch, "_target_override", ["sm_90"])
    assert launch.candidates("k.fwd", "c", configs) == configs[-1:]  # never an empty list to autotune over


def test_committed_configs_name_only_real_candidates():
    """launch_configs.json's choices are candidates of today's lists, for both targets, none pruned."""
    committed = launch.committed()
    assert set(committed) == {"sm_80", "sm_90"}
    for target, kernels in committed.items():
        for kernel, classes in kernels.items():
            for shape_class, node in classes.items():
                pruned = {n for names in node["pruned"].values() for n in names}
                assert node["chosen"] and node["chosen"] not in pruned, (target, kernel, shape_class)


def test_failure_modes_are_reported_not_crashed_on(tmp_path):
    """Real builds for sm_80 and sm_90: the spilling and the oversized kernels fail by name, the broken one is a
    compile error, the good one passes; the run exits 1 and --write-configs prunes what is past a limit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(HERE / "compile_failures.py"), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    by = {(r["kernel"], r["target"]): r for r in out["built"]}
    for target in ("sm_80", "sm_90"):
        fits = by["test.fits", target]
        assert fits["status"] == "ok" and fits["regs"] > 0 and fits["spill"] == 0
        assert by["test.spills", target]["status"] == "fail" and "spills" in by["test.spills", target]["reason"]
        assert by["test.big_dot", target]["status"] == "fail"
        assert "shared memory" in by["test.big_dot", target]["reason"]
        assert by["test.broken", target]["status"] == "error"
        assert by["test.broken", target]["reason"].startswith("compile error")
    assert by["test.big_dot", "sm_90"]["wgmma"] is True and by["test.big_dot", "sm_80"]["wgmma"] is None
    assert out["code"] == 1 and out["code_written"] == 1  # a compile error is never pruned away
    version = triton.__version__
    spills = out["configs"]["sm_90"]["test.spills"]["all"]
    assert spills["pruned"][version] == ["COLS=256,ROWS=64,warps=1,stages=3"] and spills["chosen"] is None
    assert "test.fits" not in out["configs"]["sm_80"]  # one candidate that builds: nothing to choose
    assert out["configs"]["sm_80"]["test.big_dot"]["all"]["chosen"] is None
    report = (tmp_path / f"triton-{version}.md").read_text()
    assert "| test.spills | all | sm_80 |" in report and "compile error" in report


@pytest.mark.parametrize("args,says", [
    (["--tune"], "--tune times kernels on a CUDA GPU and this machine has none"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
])  # fmt: skip
def test_command_line_refusals_are_one_sentence(args, says):
    if args == ["--tune"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --tune would run")
    proc = subprocess.run([sys.executable, "-m", "tinygraft.kernels.compile_check", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
