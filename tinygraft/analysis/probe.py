"""`tinygraft probe MODEL --train FILE --val FILE [--task classify|tokens]`: what each layer holds, read linearly.

    features   every layer (the embeddings' output, then each block's) from one backbone pass per example, kept in
               the linear-probe method's cache (models/heads.py: PooledCache): pooled by the model's own pooling
               for classify, and for tokens the first sub-token of each word, the token the tokens task tags
    probe      per layer, multinomial logistic regression on those frozen features (Alain & Bengio 2016), the
               features standardised with the training set's mean and deviation, fit full batch by L-BFGS in
               float64 from zero weights, an L2 penalty `weight_decay` / 2 · ||W||² on the mean cross-entropy. The
               problem is convex, so the fit has one optimum and nothing random: two runs give the same numbers.
    baselines  the majority class of the training labels; for tokens also Hewitt & Liang's (2019) control task:
               each word type gets a random label drawn from the training label distribution, fixed by `seed`; a
               control probe learns those labels from the same features, and selectivity = accuracy - control
               accuracy. A probe that is accurate only because it can memorise word types scores high on the
               control task too; a selective one reads the labels off the features.

The files are read by the task's own reader, with finetune's column flags (--text-col, --label-col, ...).
"""

import bisect
import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.analysis.layers import layer_states, pooled, positions_of, progress
from tinygraft.analysis.outputs import pyplot
from tinygraft.data.labeled import eval_batches
from tinygraft.errors import TinygraftError
from tinygraft.infer.embed import load_encoder
from tinygraft.models.heads import PooledCache
from tinygraft.models.pooling import Pooling
from tinygraft.tasks import get_task
from tinygraft.tasks.base import DataSettings, say
from tinygraft.train.finetune import subset

TASKS = ("classify", "tokens")
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------- the data
@dataclass
class Split:
    features: list[dict]  # the task's encoded examples (input_ids, token_type_ids, labels, ...)
    labels: torch.Tensor  # (rows,) one per example (classify) or per tagged token (tokens)
    words: list[str] | None  # tokens: the word each tagged token begins, for the control task


def read_splits(task_name: str, data: DataSettings, tokenizer) -> tuple[Split, Split, list[str]]:
    """(train, val, label names), read and encoded as `finetune` reads them (the same fixed --max-train subset)."""
    if task_name not in TASKS:
        raise TinygraftError(f"probe reads --task classify or tokens, not {task_name!r}")
    if data.train is None or data.val is None:
        raise TinygraftError("probe needs --train FILE and --val FILE (the task's labelled data)")
    if isinstance(data.train, list) or isinstance(data.val, list):
        raise TinygraftError("probe reads one --train file and one --val file")
    task = get_task(task_name)
    settings = task.Settings()  # classify: one label per text, the only problem a multinomial probe answers
    train = subset(task.read(data.train, data, settings), data.max_train)
    val = subset(task.read_validation(data, settings), data.max_val)  # a saved DatasetDict: its validation split
    label_map = task.label_map(train, settings)
    splits = []
    for examples, path in ((train, data.train), (val, data.val)):
        features = task.encode(examples, tokenizer, data, settings, label_map, str(path))
        if task_name == "classify":
            splits.append(Split(features, torch.tensor([f["labels"] for f in features]), None))
            continue
        tagged = [[p for p, y in enumerate(f["labels"]) if y != -100] for f in features]
        labels = torch.tensor([f["labels"][p] for f, ps in zip(features, tagged) for p in ps])
        words = [ex.words[f["word_ids"][p]] for ex, f, ps in zip(examples, features, tagged) for p in ps]
        splits.append(Split(features, labels, words))
    return splits[0], splits[1], label_map.names


# ------------------------------------------------------------------------------------------------ the features
def layer_rows(model: nn.Module, pooling: Pooling, tokens: bool):
    """The cache's `compute`: a batch's layers, (B, L + 1, C) pooled or, with `tokens`, (L + 1, real tokens, C) for
    each example; float32 on the CPU."""

    def compute(ids, mask, token_types):
        states = layer_states(model, ids, mask, token_types)
        if tokens:  # right-padded: an example's real tokens are its first n
            return [torch.stack([h[i, :n] for h in states]).float().cpu() for i, n in enumerate(mask.sum(1).tolist())]
        return torch.stack(pooled(states, mask, pooling), 1).float().cpu()

    return compute


def through_cache(cache: PooledCache, compute, features: list[dict], batch_size: int, pad_id: int, device):
    """(layers, labels) of each example in order, from the cache; a batch holding an example it lacks runs whole."""
    for batch in eval_batches(features, batch_size, pad_id):
        ids, mask, types = (batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))
        yield from zip(cache.rows(compute, ids, mask, types), batch["labels"])


def distinct(features: list[dict]) -> list[dict]:
    """One feature per distinct input (the cache's key: the tokens), so an example in both files is read once."""
    return list({(tuple(f["input_ids"]), tuple(f["token_type_ids"])): f for f in features}.values())


def stacked(examples, tokens: bool) -> torch.Tensor:
    """(L + 1, rows, C): a row per example, or per tagged token (the first sub-token of each word)."""
    return torch.cat([x[:, labels[: x.shape[1]] != -100] if tokens else x[:, None] for x, labels in examples], 1)


# --------------------------------------------------------------------------------------------------- the probe
@dataclass
class Probe:
    mean: torch.Tensor  # (C,) the training features' mean and deviation
    std: torch.Tensor
    weight: torch.Tensor  # (C, K)
    bias: torch.Tensor  # (K,)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (((x.to(F64) - self.mean) / self.std) @ self.weight + self.bias).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).to(F64).mean())


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-3, steps: int = 100) -> Probe:
    """Multinomial logistic regression on (N, C) features: see the module docstring."""
    x = x.to(F64)
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature is 0 once centred; leave it there
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, dtype=F64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(mean, std, weight.detach(), bias.detach())


def majority(train: torch.Tensor, val: torch.Tensor, n_classes: int) -> tuple[int, float]:
    """(the most frequent training label, the share of validation rows that carry it)."""
    label = int(torch.bincount(train, minlength=n_classes).argmax())
    return label, float((val == label).to(F64).mean())


def control_labels(words: list[str], distribution: torch.Tensor, seed: int) -> torch.Tensor:
    """Hewitt & Liang's control task: one label per word type, drawn from `distribution` by a generator seeded with
    (seed, the word) alone, so a type keeps its label in both files, whatever else they hold."""
    cdf = torch.cumsum(distribution.to(F64) / distribution.sum(), 0).tolist()
    label = {}
    for w in sorted(set(words)):
        draw = bisect.bisect_right(cdf, random.Random(f"{seed}\t{w}").random())  # str seeds hash by sha512: stable
        label[w] = min(draw, len(cdf) - 1)  # the cdf's last entry may round to just below 1
    return torch.tensor([label[w] for w in words])


# ----------------------------------------------------------------------------------------------------- the job
def split_layers(encoder: tuple, train: Split, val: Split, tokens: bool, batch_size: int):
    """(train layers, val layers, examples the backbone ran on): each (L + 1, rows, C), from one pass per distinct
    example through the cache."""
    model, tokenizer, pooling = encoder
    cache, compute = PooledCache(), layer_rows(model, pooling, tokens)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        unique = distinct(train.features + val.features)
        with progress(len(unique), "example", "probe features") as bar:
            for _ in through_cache(cache, compute, unique, batch_size, pad, device):
                bar.update(1)
        # read back in each file's order: every example is in the cache now, so the backbone does not run again
        x_train = stacked(through_cache(cache, compute, train.features, batch_size, pad, device), tokens)
        x_val = stacked(through_cache(cache, compute, val.features, batch_size, pad, device), tokens)
    finally:
        model.train(was_training)
    return x_train, x_val, cache.misses


def probe_rows(x_train, x_val, train: Split, val: Split, k: int, tokens: bool, weight_decay, steps, seed) -> list:
    """A row per layer: the probe's validation and training accuracy (and for tokens the control task's)."""
    if tokens:
        distribution = torch.bincount(train.labels, minlength=k)
        c_train, c_val = control_labels(train.words, distribution, seed), control_labels(val.words, distribution, seed)
    rows = []
    with progress(len(x_train), "layer", "probes") as bar:
        for layer, (xt, xv) in enumerate(zip(x_train, x_val)):
            fit = fit_probe(xt, train.labels, k, weight_decay, steps)
            row = {"layer": layer, "accuracy": fit.accuracy(xv, val.labels)}
            row["train_accuracy"] = fit.accuracy(xt, train.labels)
            if tokens:
                control = fit_probe(xt, c_train, k, weight_decay, steps)
                row["control_accuracy"] = control.accuracy(xv, c_val)
                row["selectivity"] = row["accuracy"] - row["control_accuracy"]
            rows.append(row)
            bar.update(1)
    return rows


def probe_model(
    encoder: tuple,
    task_name: str,
    data: DataSettings,
    batch_size: int = 32,
    weight_decay: float = 1e-3,
    steps: int = 100,
    seed: int = 0,
) -> dict:
    """The report for (model, tokenizer, pooling) as `load_encoder` gives them: a row per layer."""
    for flag, value, least in (
        ("--batch-size", batch_size, 1),
        ("--steps", steps, 1),
        ("--weight-decay", weight_decay, 0),
    ):
        if not value >= least:  # `not >=`: a NaN is refused too
            raise TinygraftError(f"{flag} must be at least {least}, got {value}")
    positions = positions_of(encoder[0])
    if data.max_length > positions:  # as finetune does
        say(f"--max-length {data.max_length} is above the model's {positions} positions; using {positions}")
        data = replace(data, max_length=positions)
    train, val, names = read_splits(task_name, data, encoder[1])
    tokens = task_name == "tokens"
    x_train, x_val, backbone_examples = split_layers(encoder, train, val, tokens, batch_size)
    top, top_accuracy = majority(train.labels, val.labels, len(names))
    return {
        "task": task_name,
        "train": str(data.train),
        "val": str(data.val),
        "examples": {"train": len(train.features), "val": len(val.features)},
        "rows": {"train": len(train.labels), "val": len(val.labels)},  # tokens: the tagged tokens
        "features": "tokens" if tokens else "pooled (" + "+".join(encoder[2].modes) + ")",
        "backbone_examples": backbone_examples,
        "labels": names,
        "majority": {"label": names[top], "accuracy": top_accuracy},
        "probe": {"weight_decay": weight_decay, "steps": steps, "seed": seed},
        "layers": probe_rows(x_train, x_val, train, val, len(names), tokens, weight_decay, steps, seed),
    }


def probe(spec: str, task_name: str, data: DataSettings, device, **kwargs) -> dict:
    """`probe_model` on anything `load_encoder` loads (a run, a checkpoint, a pretrained directory, `minilm`)."""
    return {"model": str(spec), **probe_model(load_encoder(spec, device), task_name, data, **kwargs)}


# ---------------------------------------------------------------------------------------------------- printing
def format_table(report: dict) -> str:
    tokens = report["task"] == "tokens"
    m = report["majority"]
    lines = [
        f"{report.get('model', 'model')} on {report['task']}: {report['rows']['train']} training and "
        f"{report['rows']['val']} validation {'tokens' if tokens else 'examples'}; majority class {m['label']!r} "
        f"{m['accuracy']:.4f} (layer 0 = the embeddings' output, layer i = block i's)",
        f"{'layer':>5}  {'val acc':>9}  {'train acc':>9}  {'majority':>9}"
        + ("  control  selectivity" if tokens else ""),
    ]
    for r in report["layers"]:
        line = f"{r['layer']:>5}  {r['accuracy']:>9.4f}  {r['train_accuracy']:>9.4f}  {m['accuracy']:>9.4f}"
        if tokens:
            line += f"  {r['control_accuracy']:>7.4f}  {r['selectivity']:>11.4f}"
        lines.append(line)
    return "\n".join(lines)


def accuracy_plot(report: dict):
    """Validation accuracy by depth, beside the majority baseline (and the control task for tokens)."""
    plt = pyplot()
    layers = [r["layer"] for r in report["layers"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(layers, [r["accuracy"] for r in report["layers"]], "o-", label="probe (validation)")
    if report["task"] == "tokens":
        ax.plot(layers, [r["control_accuracy"] for r in report["layers"]], "s--", label="control task")
    ax.axhline(report["majority"]["accuracy"], color="gray", ls=":", label="majority class")
    ax.set_xticks(layers)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"linear probes: {report['task']}, {report.get('model', '')}", fontsize=9)
    fig.tight_layout()
    return fig
