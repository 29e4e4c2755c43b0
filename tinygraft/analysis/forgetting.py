"""The forgetting report: what continued training learned on its own domain and what it lost on the texts it watched.

    tinygraft forgetting RUN [RUN ...] [--out DIR | --png PATH] [--json]

Per run (train/continual.py wrote it in results.json's `forgetting` and each evaluation's `watch:<label>` in
metrics.jsonl): its own domain's validation loss before and after, and each watched text's before, after and
change, headed by what it measures (loss: the LM loss; cka: a BERT fine-tuning's feature CKA with its start). The
chart has one panel per domain (the runs' own, then each watched text), one line per run over the steps, so runs
without replay, with replay, with EWC and with LoRA sit side by side.
"""

import json
from pathlib import Path

from tinygraft.analysis.outputs import pyplot
from tinygraft.core.jsonfile import jsonl_objects
from tinygraft.errors import TinygraftError
from tinygraft.train.continual import PREFIX

OWN = "own domain"


def read_run(path: str | Path) -> dict:
    """One run's row: name, own domain, before/after of each domain, and the curves."""
    run = Path(path)
    results_file = run / "results.json"
    if not results_file.is_file():
        raise TinygraftError(f"'{run}' holds no results.json; give finished runs (or ones stopped with a checkpoint)")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TinygraftError(f"'{results_file}' is not valid JSON") from None
    info = results.get("forgetting")
    if not isinstance(info, dict) or not isinstance(info.get("before"), dict):
        raise TinygraftError(
            f"'{run}' watched no text for forgetting; train it with --watch TEXT (or --replay, which watches the "
            "replay corpus)"
        )
    before, after = info["before"], results.get("metrics", {})
    measure = info.get("measure", {})
    domains = {OWN: ("loss", info.get("own"))}
    domains.update({label: (PREFIX + label, where) for label, where in info.get("watched", {}).items()})
    rows = {}
    for label, (key, where) in domains.items():
        b, a = before.get(key), after.get(key)
        rows[label] = {"text": where, "measure": measure.get(label, "loss"), "before": b, "after": a,
                       "change": None if None in (a, b) else a - b}  # fmt: skip
    curves = {label: [] for label in domains}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for _, r in jsonl_objects(metrics.read_text(encoding="utf-8"), f"'{metrics}'"):
            if r.get("split") == "val":
                for label, (key, _) in domains.items():
                    if key in r:
                        curves[label].append((r["step"], r[key]))
    for label in domains:  # step 0: where the run started
        if rows[label]["before"] is not None:
            curves[label].insert(0, (0, rows[label]["before"]))
    return {"run": run.name, "path": str(run.resolve()), "domains": rows, "curves": curves}


def report(paths: list[str]) -> dict:
    if not paths:
        raise TinygraftError("give at least one run")
    runs = [read_run(p) for p in paths]
    watched = []
    for r in runs:
        watched += [d for d in r["domains"] if d != OWN and d not in watched]
    return {"runs": runs, "watched": watched}


def _fmt(x, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.4f}" if signed else f"{x:.4f}"


def markdown(rep: dict) -> str:
    head = ["run", "own before", "own after"]
    for label in rep["watched"]:
        kinds = {r["domains"][label]["measure"] for r in rep["runs"] if label in r["domains"]}
        shown = f"{label} ({'/'.join(sorted(kinds))})"  # the LM loss, or a BERT fine-tuning's feature CKA
        head += [f"{shown} before", f"{shown} after", f"{shown} change"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rep["runs"]:
        own = r["domains"][OWN]
        cells = [r["run"], _fmt(own["before"]), _fmt(own["after"])]
        for label in rep["watched"]:
            d = r["domains"].get(label, {})
            cells += [_fmt(d.get("before")), _fmt(d.get("after")), _fmt(d.get("change"), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(rep: dict):
    plt = pyplot()
    panels = [OWN, *rep["watched"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, label in zip(axes[0], panels):
        for r in rep["runs"]:
            pts = r["curves"].get(label, [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=r["run"])
        ax.set_title(f"{label} (val loss)" if label == OWN else f"watched: {label}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig
