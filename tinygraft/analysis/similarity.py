"""`tinygraft cka A B --data FILE`: how alike two checkpoints' layers are on the same texts (the maths: cka.py).

A and B are anything `tinygraft embed --from` takes (a run, a checkpoint, a pretrained directory, `minilm`): a base
and its fine-tuned run, LoRA and full fine-tuning, two seeds. Both read the same texts, cut at the same length, in
the same batches (analysis/layers.py); each batch's layers go into one accumulator, every layer of A against every
layer of B, so one pass gives the whole layer x layer map in memory that does not grow with the texts.

Refused before any pass: A and B of different families or with different tokenizers (their tokens would not line
up), fewer than 4 texts (the debiased estimator's least). Depths and widths may differ.
"""

from pathlib import Path

from torch import nn

from tinygraft.analysis.layers import default_max_len, layer_features, progress
from tinygraft.analysis.outputs import pyplot
from tinygraft.core.cka import LayerSimilarity, check_keep
from tinygraft.errors import TinygraftError
from tinygraft.infer.embed import load_encoder, read_texts
from tinygraft.models.gpt import GPT
from tinygraft.train.distill_losses import n_layers

MEASURES = (("cka_debiased", "debiased CKA"), ("cka_biased", "biased CKA"), ("svcca", "SVCCA"))


def family(model: nn.Module) -> str:
    return "GPT" if isinstance(model, GPT) else "BERT"


def check_pair(a: str, b: str, enc_a, enc_b) -> None:
    (model_a, tok_a, _), (model_b, tok_b, _) = enc_a, enc_b
    if family(model_a) != family(model_b):
        raise TinygraftError(
            f"'{a}' is a {family(model_a)} and '{b}' a {family(model_b)}; cka compares two checkpoints of one family"
        )
    if tok_a.to_json() != tok_b.to_json():
        raise TinygraftError(
            f"'{a}' and '{b}' have different tokenizers, so their inputs do not line up; cka compares checkpoints "
            "that share one (a base and its fine-tuned run, two seeds)"
        )


def compare_layers(
    a: str,
    b: str,
    data: str,
    device,
    tokens: bool = False,
    max_texts: int | None = None,
    batch_size: int = 32,
    max_len: int | None = None,
    keep: float = 0.99,
) -> dict:
    """The report: the three (La + 1) x (Lb + 1) matrices over the texts of `data` (the first `max_texts`), their
    diagonal, and what they were computed on."""
    for flag, value in (("--max-texts", max_texts), ("--batch-size", batch_size), ("--max-len", max_len)):
        if value is not None and value < 1:
            raise TinygraftError(f"{flag} must be at least 1, got {value}")
    check_keep(keep)
    texts = read_texts(data)[:max_texts]
    if len(texts) < 4:
        raise TinygraftError(
            f"cka needs at least 4 texts (the debiased estimator's least); '{data}' gives {len(texts)}"
        )
    enc_a, enc_b = load_encoder(a, device), load_encoder(b, device)
    check_pair(a, b, enc_a, enc_b)
    # one length for both, or a checkpoint cut at 256 tokens would be compared with one reading 512
    max_len = max_len or min(default_max_len(enc_a[0], enc_a[2]), default_max_len(enc_b[0], enc_b[2]))
    acc = LayerSimilarity()
    streams = [layer_features(m, tok, texts, pool, tokens, batch_size, max_len) for m, tok, pool in (enc_a, enc_b)]
    with progress(len(texts), "text", "cka") as bar:
        for xs, ys in zip(*streams):
            acc.add(xs, ys)
            bar.update(min(batch_size, len(texts) - bar.n))
    matrices = {"cka_debiased": acc.cka(debiased=True), "cka_biased": acc.cka(debiased=False), "svcca": acc.svcca(keep)}
    depth = min(n_layers(enc_a[0]), n_layers(enc_b[0]))
    return {
        "a": str(a),
        "b": str(b),
        "data": str(data),
        "texts": len(texts),
        "rows": acc.n,
        "features": "tokens" if tokens else "pooled",
        "max_len": max_len,
        "layers": {"a": n_layers(enc_a[0]), "b": n_layers(enc_b[0])},
        "svcca_keep": keep,
        **{key: m.tolist() for key, m in matrices.items()},
        "diagonal": [{"layer": i, **{key: float(m[i, i]) for key, m in matrices.items()}} for i in range(depth + 1)],
    }


def format_table(report: dict) -> str:
    rows = f"{report['texts']} texts"
    if report["features"] == "tokens":
        rows = f"{report['rows']} tokens of {rows}"
    lines = [
        f"{report['a']} vs {report['b']}, {rows} (layer 0 = the embeddings' output, layer i = block i's):",
        f"{'layer':>5}  " + "  ".join(f"{title:>12}" for _, title in MEASURES),
    ]
    for row in report["diagonal"]:
        lines.append(f"{row['layer']:>5}  " + "  ".join(f"{row[key]:>12.4f}" for key, _ in MEASURES))
    return "\n".join(lines)


def heatmap(report: dict):
    """The three layer x layer matrices side by side: A's layers down, B's across."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), squeeze=False)
    for ax, (key, title) in zip(axes[0], MEASURES):
        m = report[key]
        image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
        if len(m) * len(m[0]) <= 169:  # up to 13 x 13 layers the numbers still fit their cells
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title(title + (f" ({report['svcca_keep']:.0%} variance)" if key == "svcca" else ""))
        ax.set_xlabel(f"{Path(report['b']).name}: layer")
        ax.set_ylabel(f"{Path(report['a']).name}: layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    rows = f"{report['rows']} {'tokens' if report['features'] == 'tokens' else 'texts'}"
    fig.suptitle(f"{report['a']} vs {report['b']}: {rows} (layer 0: the embeddings' output)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title above the panels' own
    return fig
