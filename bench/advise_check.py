"""Does `tinygraft advise` pick well? Its recommendation beside the `compare` it prints, on SST-2 subsets and the demo.

    python -m bench.advise_check [--work DIR] [--cases sst2-50,sst2-500,sst2-5000,demo]

Each case runs `tinygraft advise` (MiniLM, SST-2's sentences with label texts for zero-shot, the fixed --max-train
subset; the stdlib docstring demo), then the `compare` command advise printed (zero-shot, linear-probe, LoRA, full at
the tree's epochs, seeds 0, 1, 2). The check, issue 21's: the recommended method's mean is within max(1 point, the
best's std) of the best mean of that compare, at no more train time than the best's. Runs already in --work (default
runs/advise-check) are reused, so a rerun redoes only what changed. Writes
bench/results/cpu/advise-check.{md,json,png} and every case's advice.md / compare.md beside them.
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
OUT = REPO / "bench" / "results" / "cpu"
LABELS = ["--label-text", "0=a negative review", "--label-text", "1=a positive review"]
SST2_FLAGS = ["--train", str(SST2 / "train.tsv"), "--val", str(SST2 / "dev.tsv"), "--text-col", "sentence",
              *LABELS, "--max-length", "64"]  # fmt: skip
CASES = {
    "sst2-50": [*SST2_FLAGS, "--max-train", "50"],
    "sst2-500": [*SST2_FLAGS, "--max-train", "500"],
    "sst2-5000": [*SST2_FLAGS, "--max-train", "5000"],
    "demo": [],  # no --train: the stdlib docstring demo, 694 docstrings of 6 packages
}


def tinygraft(args: list[str], capture: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", "tinygraft", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)  # fmt: skip
    return done.stdout if capture else ""


def check(report: dict, rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows}
    best = max(rows, key=lambda r: r["mean"])
    pick = by[report["advice"]["method"]]
    slack = max(0.01, best["std"])
    return {
        "best": best["method"],
        "best_mean": best["mean"],
        "best_std": best["std"],
        "best_seconds": best["train_seconds"],
        "pick": pick["method"],
        "pick_mean": pick["mean"],
        "pick_std": pick["std"],
        "pick_seconds": pick["train_seconds"],
        "slack": slack,
        "within": best["mean"] - pick["mean"] <= slack,
        "no_slower": pick["train_seconds"] <= best["train_seconds"] + 1e-9,
    }


def run_case(name: str, flags: list[str], work: Path, report_only: bool) -> dict:
    out = work / name
    if report_only:
        report = json.loads((out / "advice.json").read_text())
    else:
        report = json.loads(tinygraft(["advise", "--from", "minilm", *flags, "--out", str(out), "--json"], True))
        tinygraft(shlex.split(report["commands"]["compare"])[1:])
    rows = json.loads((out / "compare" / "compare.json").read_text())["rows"]
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "advice.md", OUT / f"advise-{name}.md")
    shutil.copy(out / "compare" / "compare.md", OUT / f"advise-{name}-compare.md")
    keep = {"scores": report["scores"], "advice": report["advice"], "commands": report["commands"]}
    return {"case": name, "examples": report["data"]["examples"], **keep, "rows": rows, "check": check(report, rows)}


def markdown(results: list[dict]) -> str:
    lines = [
        "| case | examples | measured by advise | recommended | compare: best (mean ± std, train s) | "
        "recommended in compare | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, a = r["check"], r["advice"]
        scores = ", ".join(f"{m} {v:.3f}" for m, v in r["scores"].items())
        epochs = f", {a['epochs']} epoch{'s' if a['epochs'] > 1 else ''}"
        rec = a["method"] + (epochs if a["method"] not in ("zero-shot", "linear-probe") else "")
        holds = "yes" if c["within"] and c["no_slower"] else "**no**"
        lines.append(
            f"| {r['case']} | {r['examples']:,} | {scores} | {rec} | {c['best']} {c['best_mean']:.4f} ± "
            f"{c['best_std']:.4f}, {c['best_seconds']:.1f} s | {c['pick_mean']:.4f} ± {c['pick_std']:.4f}, "
            f"{c['pick_seconds']:.1f} s | {holds} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        rows = r["rows"]
        names = [x["method"] for x in rows]
        colors = ["tab:green" if m == r["advice"]["method"] else "tab:gray" for m in names]
        ax.bar(names, [x["mean"] for x in rows], yerr=[x["std"] for x in rows], color=colors, capsize=3)
        low = min(x["mean"] - x["std"] for x in rows)
        ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(x["mean"] + x["std"] for x in rows) + 0.03))
        ax.set_title(f"{r['case']} ({r['examples']:,})")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{results[0]['rows'][0]['metric']} (3 seeds); green: advise's pick")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/advise-check", help="where the runs go (reused when rerun)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--report-only", action="store_true", help="tabulate the advice.json and compare.json in --work")
    ns = p.parse_args()
    names = [c.strip() for c in ns.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"error: unknown case {unknown[0]!r} (known: {', '.join(CASES)})", file=sys.stderr)
        return 2
    results = [run_case(c, CASES[c], Path(ns.work), ns.report_only) for c in names]
    text = markdown(results)
    print(text)
    (OUT / "advise-check.md").write_text(text, encoding="utf-8")
    (OUT / "advise-check.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, OUT / "advise-check.png")
    print(f"wrote {OUT / 'advise-check.md'}, .json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
