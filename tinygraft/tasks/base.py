"""What a fine-tuning task is: the protocol every task file fills in, and the settings all tasks share.

A task is one file (tasks/classify.py, tokens.py, qa.py, similarity.py, instruct.py) and one registry line
(tasks/__init__.py). It says, for the one fine-tuning job and for `predict`:

    columns       the default text, second-text and label columns of a table (--text-col ... override them)
    Settings      its own flags, one dataclass of `setting` fields (classify's --problem, qa's --doc-stride, ...)
    read          a file's examples (the training and validation files; `predict`'s input in the same shapes;
                  `read_training` / `read_validation` when the two sides come from one file)
    label_map     the label names, from the training examples (None for a task without classes)
    encode        examples -> features (dicts of Python lists) the collate of data/labeled.py pads into batches
    make_head     the module over the backbone that turns its features into outputs and a loss
    peft_head     the head as peft's task model for this task holds it (an adapter export carries it), or None
    metric        the validation metric that picks the best checkpoint, and whether higher is better
    scorer        what gathers outputs over the validation batches into that task's metrics
    predict       a fine-tuned model's output for each example, as the JSON objects `predict` prints

The defaults below serve a task whose examples come from tables; a task overrides what differs.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinygraft.core import dist
from tinygraft.core.config import setting
from tinygraft.data import arrow
from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.peft.files import PeftHead

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt")


@dataclass
class DataSettings:
    """The files a fine-tuning run reads and how: shared by every task (section `data` of a run's config)."""

    train: str | list[str] | None = setting(
        None,
        "training data (TSV/CSV/JSONL, Parquet, a `datasets` save_to_disk DIR or DIR:SPLIT, CoNLL, SQuAD JSON); "
        "omitted: the stdlib docstring demo; NAME=FILE, repeated: one adapter and head per name, trained together in "
        "mixed batches",
        repeat=True,
    )
    val: str | list[str] | None = setting(
        None,
        "validation data (a SQuAD JSON given as --train alone is split by article; a saved DatasetDict DIR: its "
        "validation split); NAME=FILE with named --train",
        repeat=True,
    )
    text_col: str | None = setting(None, "text column (default: the task's own, e.g. classify: text, qa: question)")
    text_pair_col: str | None = setting(None, "second text column (sentence pairs; qa: context; similarity: sentence2)")
    label_col: str | None = setting(None, "label column (classify: label; tokens: tags; qa: answer; similarity: score)")
    quote_none: bool = setting(False, "read quote characters as text (STS-B)")
    max_train: int | None = setting(None, "use a fixed random subset of this many training examples")
    max_val: int | None = setting(None, "use a fixed random subset of this many validation examples")
    max_length: int = setting(128, "tokens per example, special tokens included (QA: per window)")

    def __post_init__(self):
        for name in ("max_train", "max_val", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TinygraftError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@dataclass
class NoSettings:
    """A task or method without settings of its own."""


class Scorer:
    """Gathers a model's outputs over the validation batches; `result()` gives the metrics, "loss" among them.

    Under several processes each rank scores its contiguous share of the batches (core/dist.share) and `gather`
    joins the shares on every rank: the lists named in `collected`, concatenated in rank order (so in batch
    order), and the loss sums; the metrics that need every prediction (Spearman, entity F1, SQuAD) then see each
    validation example once.
    """

    # The lists `collect` appends to, one entry per example or batch; None (a plugin's scorer that does not say):
    # every rank scores every batch.
    collected: tuple[str, ...] | None = None

    def __init__(self):
        self.loss_sum, self.loss_weight = 0.0, 0

    def gather(self) -> None:
        if not dist.splitting() or self.collected is None:
            return
        names = ("loss_sum", "loss_weight", *self.collected)
        every = dist.gather({k: dist.picklable_cpu(getattr(self, k)) for k in names})
        self.loss_sum = sum(e["loss_sum"] for e in every)
        self.loss_weight = sum(e["loss_weight"] for e in every)
        for k in self.collected:
            setattr(self, k, [x for e in every for x in e[k]])

    def add(self, outputs: dict, batch: dict, loss=None) -> None:
        if loss is not None:  # mean over examples, or over target tokens for language modelling
            n = int(batch[next(k for k in batch if k.startswith("input_ids"))].shape[0])
            w = int(outputs["n_targets"]) if "n_targets" in outputs else n
            self.loss_sum, self.loss_weight = self.loss_sum + float(loss) * w, self.loss_weight + w
        self.collect(outputs, batch)

    def collect(self, outputs: dict, batch: dict) -> None:
        """Keep what the metrics need of one batch."""

    def metrics(self) -> dict[str, float]:
        return {}

    def result(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / self.loss_weight} if self.loss_weight else {}
        return {**out, **self.metrics()}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Task:
    """The protocol (see the module docstring); a subclass sets `name` and overrides what its task needs."""

    name = "task"
    summary = ""  # one line for --help
    Settings: type = NoSettings
    columns: tuple[str | None, str | None, str | None] = ("text", None, "label")
    family: str | None = None  # the backbone family the task needs, or None for either
    input_formats: tuple[str, ...] = ("table", "text")  # how `predict` may read its input (--input-format)

    # ---------------------------------------------------------------------------------------------- data
    def column_names(self, data: DataSettings) -> tuple[str | None, str | None, str | None]:
        text, pair, label = self.columns
        return data.text_col or text, data.text_pair_col or pair, data.label_col or label

    def demo(self, out_dir: Path) -> tuple[Path, Path] | None:
        """(train, val) files of a built-in demo when --train is omitted, or None: the task needs --train."""
        return None

    def read(self, path: str, data: DataSettings, settings, labeled: bool = True) -> list:
        raise NotImplementedError

    def read_training(self, data: DataSettings, settings) -> list:
        return self.read(data.train, data, settings)

    def read_validation(self, data: DataSettings, settings) -> list:
        if data.val is None:
            raise TinygraftError(f"the {self.name} task needs --val FILE (validation data) besides --train")
        return self.read(arrow.with_split(data.val, "validation"), data, settings)  # a saved DatasetDict's own

    def label_map(self, examples: list, settings) -> L.LabelMap | None:
        return None

    def encode(self, examples: list, tokenizer, data: DataSettings, settings, label_map, source: str) -> list[dict]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- model
    def make_head(self, backbone: nn.Module, settings, label_map: L.LabelMap | None, pooling: str | None) -> nn.Module:
        """The head over `backbone`; `pooling` is the checkpoint's own sentence pooling, or None."""
        raise NotImplementedError

    def describe_head(self, head: nn.Module) -> dict:
        """What rebuilds the head with `make_head` (stored in config.json), beside the settings."""
        return {}

    def peft_head(self, head: nn.Module) -> PeftHead | None:
        """The head as the task model of peft + transformers for this task holds it (`task_type`, tensors under
        transformers' names), for an exported adapter to carry; None where no such model computes what it does."""
        return None

    def metric(self, settings) -> tuple[str, bool]:
        """(validation metric that picks the best checkpoint, higher is better)."""
        raise NotImplementedError

    def scorer(self, settings, label_map, examples: list, features: list[dict]) -> Scorer:
        raise NotImplementedError

    def loss_count(self, batch: dict) -> int:
        """What the head's loss is the mean over in a batch: its examples here, target tokens for a token task
        (several processes weigh their shares of a batch by it: train/parallel.py)."""
        return int(batch[next(k for k in batch if k.startswith("input_ids"))].shape[0])

    # ---------------------------------------------------------------------------------------------- predict
    def predict_format(self, source: str | None, data: DataSettings, label_map) -> str:
        """The reading of `predict`'s input when --input-format is not given: the shape --train accepts when the
        file has it (a table with the run's columns), else one example per line."""
        if source is None or source == "-":
            return "text"
        text, pair, _ = self.column_names(data)
        wanted = [c for c in (text, pair if self.pair_input(data) else None) if c]
        return "table" if has_columns(source, wanted, data.quote_none) else "text"

    def pair_input(self, data: DataSettings) -> bool:
        """Whether an example holds two texts (a plain-text input line then holds both, tab-separated)."""
        return False

    def read_predict(self, source: str | None, fmt: str, data: DataSettings, settings) -> list:
        """`predict`'s examples, unlabeled, read as `fmt` (one of `input_formats`)."""
        if fmt == "table":
            return self.read(source, data, settings, labeled=False)
        pair = self.pair_input(data)
        lines = read_lines(source)
        if pair:
            return [L.Example(*split_pair(line, 2, "two texts"), None, i + 1) for i, line in enumerate(lines)]
        return [L.Example(line, None, None, i + 1) for i, line in enumerate(lines)]

    @torch.no_grad()
    def predict(
        self,
        model,
        tokenizer,
        examples: list,
        data: DataSettings,
        settings,
        label_map,
        batch_size: int,
        max_new_tokens: int,
    ) -> list[dict]:
        """One JSON object per example: encode, run the model over padded batches, `rows`."""
        device = next(model.parameters()).device
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        features = self.encode(examples, tokenizer, data, settings, None, "the input")
        outs = []
        for batch in L.eval_batches(features, batch_size, pad):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            outputs, _ = model(batch)
            outs.append(({k: v.float().cpu() for k, v in outputs.items() if isinstance(v, torch.Tensor)}, batch))
        return self.rows(examples, features, outs, settings, label_map)

    def rows(self, examples: list, features: list[dict], outs: list, settings, label_map) -> list[dict]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------- inputs
READINGS = {
    "table": "a table with the run's columns",
    "text": "one example per line",
    "conll": "CoNLL columns (word ... tag)",
    "jsonl": "JSON Lines token lists",
    "squad": "SQuAD JSON",
}


def has_columns(path: str, columns: list[str], quote_none: bool = False) -> bool:
    """Whether `path` is a table (TSV/CSV/JSONL/JSON, a .txt as TSV) whose header holds `columns`."""
    p = Path(path)
    if p.suffix not in TABLE_SUFFIXES or not p.is_file() or not columns:
        return False
    try:
        if p.suffix in (".jsonl", ".json"):
            names, _ = L.read_rows(p, quote_none)
        else:
            with p.open(encoding="utf-8", newline="") as f:
                quoting = csv.QUOTE_NONE if quote_none else csv.QUOTE_MINIMAL
                names = [h.strip() for h in next(csv.reader(f, delimiter=L.DELIMITERS[p.suffix], quoting=quoting))]
    except (TinygraftError, StopIteration, UnicodeDecodeError, csv.Error, OSError):
        return False
    return all(c in names for c in columns)


def read_lines(source: str | None) -> list[str]:
    if source is None or source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TinygraftError(f"input file '{source}' does not exist") from None
        except IsADirectoryError:
            raise TinygraftError(f"input '{source}' is a directory; give a file") from None
        except UnicodeDecodeError:
            raise TinygraftError(f"input file '{source}' is not UTF-8 text") from None
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise TinygraftError(f"{'stdin' if source in (None, '-') else repr(source)} holds no input to predict on")
    return lines


def split_pair(line: str, n: int, what: str) -> list[str]:
    parts = line.split("\t")
    if len(parts) != n:
        raise TinygraftError(f"each input line must hold {what} separated by a tab; got {line[:60]!r}")
    return parts
