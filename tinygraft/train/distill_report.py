"""The table a distillation run ends with: teacher, student (and, from bench/distill.py, the student trained
alone): the metric, the parameters and the inference speed, as distill.md, distill.json and distill.png.

    rows = [{"model": "teacher", "metric": 0.91, "params": 22.7e6, "examples_per_s": 410.0}, ...]
    write_table(run_dir / "distill", rows, "accuracy")

A row's "metric" may carry "metric_std" (a mean over seeds); missing figures show as "-".
"""

import json
import time
from pathlib import Path

import torch

from tinygraft.core import checkpoint
from tinygraft.data import labeled as L
from tinygraft.train.loop import to_device


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def examples_per_s(model: torch.nn.Module, features: list[dict], batch_size: int, pad_id: int, device,
                   limit: int = 512) -> float:  # fmt: skip
    """Forward passes over up to `limit` validation examples in eval mode (after one warm-up batch), as predict runs."""
    model = model.to(device).eval()
    rows = features[:limit]
    with torch.no_grad():
        for batch in L.eval_batches(rows[:batch_size], batch_size, pad_id):
            model(to_device(batch, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for batch in L.eval_batches(rows, batch_size, pad_id):
            model(to_device(batch, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return len(rows) / max(time.perf_counter() - t0, 1e-9)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    text = format(value, fmt)
    std = row.get(key + "_std")
    return f"{text} ± {std:{fmt}}" if std is not None else text


def markdown(rows: list[dict], metric: str) -> str:
    lines = [f"| model | {metric} | parameters | inference examples/s |", "|---|---:|---:|---:|"]
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") is not None else "-"
        lines.append(f"| {r['model']} | {_cell(r, 'metric', '.4f')} | {params} | {_cell(r, 'examples_per_s', '.1f')} |")
    return "\n".join(lines) + "\n"


def write_table(stem: Path, rows: list[dict], metric: str) -> None:
    stem = Path(stem)
    checkpoint.atomic_write(stem.with_suffix(".md"), markdown(rows, metric))
    checkpoint.atomic_write(stem.with_suffix(".json"), json.dumps({"metric": metric, "rows": rows}, indent=2) + "\n")
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(axes, ("metric", "params", "examples_per_s"), (metric, "parameters", "examples/s")):
        values = [r.get(key) or 0.0 for r in rows]
        errors = [r.get(key + "_std") or 0.0 for r in rows]
        ax.bar(names, values, yerr=errors, color=["#555", "#2a7", "#c73"][: len(rows)], capsize=4)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
