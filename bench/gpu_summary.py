"""summary.md for a bench/gpu.sh run: every figure it measured against its goal in DESIGN §7.

    python -m bench.gpu_summary RESULTS_DIR [--dry-run]

Goals: attention forward+backward at head dim 128 >= the best SDPA backend of the same run and >= 300 TFLOP/s;
fused LoRA forward+backward <= 1.10x the frozen base matmul alone; AdamW >= 85% of the copy bandwidth measured in
the same run; GPT-2 124M training >= 45% MFU against the bf16 matmul peak measured in the same run. A figure that
is missing says so (its stage did not run or did not finish: stages.tsv says which).
"""

import argparse
import json
import sys
from pathlib import Path


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def attention_lines(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if r["mode"] == "fwd+bwd" and r["D"] == 128 and r.get("tflops")]
    lines = []
    for causal in (False, True):
        for T in sorted({r["T"] for r in rows if r["causal"] == causal}):
            case = [r for r in rows if r["causal"] == causal and r["T"] == T]
            ours = next((r for r in case if r["impl"] == "tinygraft"), None)
            sdpa = max((r for r in case if r["impl"].startswith("sdpa")), key=lambda r: r["tflops"], default=None)
            if ours is None or sdpa is None:
                continue
            ok = ours["tflops"] >= sdpa["tflops"] and ours["tflops"] >= 300
            lines.append(f"| attention fwd+bwd hd128 T={T}{' causal' if causal else ''} | {ours['tflops']:.0f} "
                         f"TFLOP/s vs {sdpa['impl']} {sdpa['tflops']:.0f} | >= best SDPA and >= 300 | "
                         f"{_verdict(ok)} |")  # fmt: skip
    return lines


def lora_lines(data: dict) -> list[str]:
    by = {(r["case"], r["pass_"], r["impl"]): r for r in data["rows"]}
    lines = []
    for case in dict.fromkeys(r["case"] for r in data["rows"]):
        fused, base = by.get((case, "fwd+bwd", "tinygraft")), by.get((case, "fwd+bwd", "base"))
        if fused and base:
            ratio = fused["ms"] / base["ms"]
            lines.append(
                f"| LoRA fwd+bwd {case} | {ratio:.2f}x the base matmul | <= 1.10x | {_verdict(ratio <= 1.10)} |"
            )
    return lines


def adamw_lines(data: dict) -> list[str]:
    ceiling = data["notes"].get("copy_bandwidth_gbps")
    lines = []
    for r in data["rows"]:
        if r["impl"] == "tinygraft":
            lines.append(f"| AdamW {r['size']} {r['dtype']} | {r['gbps']:.0f} GB/s = {r['pct_copy']:.0f}% of copy "
                         f"({ceiling:.0f} GB/s) | >= 85% | {_verdict(r['pct_copy'] >= 85)} |")  # fmt: skip
    return lines


def train_lines(data: dict, label: str) -> list[str]:
    lines = []
    for r in data["rows"]:
        mfu = r.get("of_peak")
        if r["impl"] == "tinygraft" and r["preset"] == "gpt2" and "bf16" in r.get("precision", "") and mfu is not None:
            lines.append(f"| GPT-2 124M T={r['seq']} bf16 {label} | {r['tokens_per_s']:.0f} tok/s, MFU "
                         f"{100 * mfu:.1f}% | >= 45% | {_verdict(mfu >= 0.45)} |")  # fmt: skip
    return lines


def ddp_lines(data: dict) -> list[str]:
    """DDP's scaling at the most processes measured (none on a machine with one GPU: nothing to scale to)."""
    rows = [r for r in data["rows"] if r["impl"] == "tinygraft" and r["processes"] > 1]
    if not rows:
        return []
    r = max(rows, key=lambda r: r["processes"])
    return [f"| DDP scaling, {r['processes']} processes | {r['tokens_per_s']:.0f} tok/s, efficiency "
            f"{100 * r['efficiency']:.0f}% | >= 90% | {_verdict(r['efficiency'] >= 0.90)} |"]  # fmt: skip


def summary(results: Path, dry_run: bool) -> str:
    parts = [("attention", attention_lines), ("lora", lora_lines), ("adamw", adamw_lines),
             ("train_throughput", lambda d: train_lines(d, "eager")),
             ("train_throughput-compile", lambda d: train_lines(d, "torch.compile")),
             ("ddp_scaling", ddp_lines)]  # fmt: skip
    lines = ["| figure | measured | goal | verdict |", "|---|---|---|---|"]
    missing = []
    for name, fn in parts:
        data = _load(results, name)
        found = fn(data) if data else []
        lines += found
        if not found:
            missing.append(name)
    head = "# GPU run summary" + (" (dry run: toy shapes on a CPU, no figure is meaningful)" if dry_run else "")
    device = next((d["device"] for n, _ in parts if (d := _load(results, n))), "unknown device")
    text = f"{head}\n\nDevice: {device}. Goals: DESIGN §7.\n\n" + "\n".join(lines) + "\n"
    if missing:
        text += f"\nNot measured (no result, or no row the goal applies to): {', '.join(missing)}.\n"
    stages = results / "stages.tsv"
    if stages.is_file():
        text += (
            "\nStages (exit 124: stopped at its time limit):\n\n```\n" + stages.read_text(encoding="utf-8") + "```\n"
        )
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        print(f"bench.gpu_summary: '{args.results}' is not a results folder", file=sys.stderr)
        return 2
    text = summary(args.results, args.dry_run)
    (args.results / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
