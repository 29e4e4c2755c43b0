"""loss.png: train and validation curves from metrics.jsonl (and the task metric when fine-tuning)."""

from pathlib import Path

LOSS_KEYS = ("loss", "perplexity")


def plot_metrics(rows: list[dict], path: str | Path, metric: str | None = None) -> None:
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")  # no display needed; only a file is written
    import matplotlib.pyplot as plt  # noqa: PLC0415

    train = [r for r in rows if r.get("split") == "train" and "loss" in r]
    val = [r for r in rows if r.get("split") == "val" and "loss" in r]
    extra = metric not in (None, *LOSS_KEYS) and any(metric in r for r in val)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(10 if extra else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax = axes[0][1]
        pts = [r for r in val if metric in r]
        ax.plot([r["step"] for r in pts], [r[metric] for r in pts], "o-", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
