"""bench/gpu.sh's refusals (CI walks its stages with --dry-run) and bench/gpu_summary.py's verdicts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of the repository, not of the package

from bench import gpu_summary  # noqa: E402


@pytest.mark.parametrize("args,says", [
    (["--bogus"], "'--bogus' is not an option"),
    (["--only", "nope"], "--only takes one of tests attention lora adamw train extras summary, not 'nope'"),
    ([], "no CUDA GPU here; --dry-run walks the stages on a CPU"),
])  # fmt: skip
def test_gpu_script_refuses_in_one_sentence(args, says):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _write(folder: Path, name: str, rows: list[dict], notes: dict | None = None) -> None:
    data = {"bench": name, "device": "NVIDIA H200", "notes": notes or {}, "rows": rows}
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_summary_sets_each_figure_against_its_goal(tmp_path):
    attn = dict(mode="fwd+bwd", D=128, causal=True, T=4096)
    _write(tmp_path, "attention", [{**attn, "impl": "tinygraft", "tflops": 320.0},
                                   {**attn, "impl": "sdpa-flash", "tflops": 310.0},
                                   {**attn, "impl": "sdpa-cudnn", "tflops": 350.0},
                                   {**attn, "D": 64, "impl": "tinygraft", "tflops": 1.0}])  # fmt: skip
    lora = dict(case="4096x4096 r16 T8192", pass_="fwd+bwd")
    _write(tmp_path, "lora", [{**lora, "impl": "tinygraft", "ms": 1.05}, {**lora, "impl": "base", "ms": 1.0}])
    _write(tmp_path, "adamw", [{"impl": "tinygraft", "size": "gpt2-124M", "dtype": "float32", "gbps": 4000.0,
                                "pct_copy": 88.0}], notes={"copy_bandwidth_gbps": 4545.0})  # fmt: skip
    _write(tmp_path, "train_throughput", [{"impl": "tinygraft", "preset": "gpt2", "seq": 1024, "tokens_per_s": 4e5,
                                           "precision": "auto (bf16)", "of_peak": 0.41},
                                          {"impl": "tinygraft", "preset": "gpt2", "seq": 1024, "tokens_per_s": 2e5,
                                           "precision": "fp32", "of_peak": 0.9}])  # fmt: skip
    _write(tmp_path, "ddp_scaling", [{"impl": "tinygraft", "processes": 1, "tokens_per_s": 1e5, "efficiency": 1.0},
                                      {"impl": "tinygraft", "processes": 8, "tokens_per_s": 7.4e5,
                                       "efficiency": 0.925}])  # fmt: skip
    text = gpu_summary.summary(tmp_path, dry_run=False)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "efficiency 92%" in lines["DDP scaling, 8 processes"] and lines["DDP scaling, 8 processes"].endswith("met |")
    assert "320 TFLOP/s vs sdpa-cudnn 350" in lines["attention fwd+bwd hd128 T=4096 causal"]  # the best backend
    assert lines["attention fwd+bwd hd128 T=4096 causal"].endswith("**missed** |")
    assert "1.05x" in lines["LoRA fwd+bwd 4096x4096 r16 T8192"] and lines["LoRA fwd+bwd 4096x4096 r16 T8192"].endswith(
        "| met |"
    )
    assert lines["AdamW gpt2-124M float32"].endswith("| met |")
    assert "41.0%" in lines["GPT-2 124M T=1024 bf16 eager"] and "**missed**" in lines["GPT-2 124M T=1024 bf16 eager"]
    assert "Not measured (no result, or no row the goal applies to): train_throughput-compile." in text
