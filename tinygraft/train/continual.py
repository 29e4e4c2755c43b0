"""Adapting without forgetting: the `continual` settings of `tinygraft pretrain` (below) and `finetune --watch`.

    --replay OLD --replay-ratio R   R of every batch's rows from OLD's training split (data/compose.py ReplayMix);
                                    OLD's validation split is never trained on, so watching it measures forgetting
    --ewc LAMBDA                    EWC's penalty (train/ewc.py) with the Fisher of --ewc-data (default: the --from
                                    run's own corpus) over --ewc-samples sequences, computed once per run
    --watch TEXT                    at every evaluation, the LM loss on TEXT's held-out split beside the run's own:
                                    metrics `watch:<label>`; default with --replay: the replay corpus

A corpus is split the way pre-training splits it (TokenCache, the run's val_fraction), with the run's tokenizer: so
the old run's corpus, replayed or watched, falls into the same training and validation tokens it had there.

A fine-tuning run watches a text through its backbone: a GPT's LM loss (its tied head), a BERT's feature drift (the
debiased linear CKA of its pooled features with the starting model's, core/cka.py), since MiniLM has no LM head.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygraft.core.cka import LayerSimilarity
from tinygraft.data.compose import ReplayMix
from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.errors import TinygraftError
from tinygraft.models.gpt import GPT
from tinygraft.models.pooling import pool, token_states
from tinygraft.tasks.lm import objective_for
from tinygraft.train import runs
from tinygraft.train.config import ContinualSettings, DataConfig
from tinygraft.train.ewc import EWC, check_method, fisher_diagonal
from tinygraft.train.loop import to_device

DEFAULT_CORPUS = "pydoc_data.topics"
PREFIX = "watch:"


@dataclass
class Corpus:
    label: str
    path: str | None  # None: the default corpus
    cache: TokenCache


def as_list(value) -> list:
    """A repeatable setting's value (None, one string, or several) as a list."""
    return value if isinstance(value, list) else [value] if value else []


def record(path: str, run_dir: Path) -> str:
    """A corpus as a run records it (train/runs.py record_path); the default corpus by its name."""
    return path if path == DEFAULT_CORPUS else runs.record_path(path, run_dir)


def in_run_dir(settings, run_dir: Path):
    """The settings (pre-training's or fine-tuning's) with the files a run recorded relative to itself made readable
    from here."""
    where = lambda p: p if p is None or p == DEFAULT_CORPUS else runs.in_run(run_dir, p)  # noqa: E731
    paths = {k: where(getattr(settings, k)) for k in ("replay", "ewc_data") if hasattr(settings, k)}
    return dataclasses.replace(settings, watch=[where(p) for p in as_list(settings.watch)] or None, **paths)


def watch_list(settings: ContinualSettings) -> list[str]:
    replay = getattr(settings, "replay", None)  # fine-tuning has none
    return as_list(settings.watch) or as_list(replay)


def labels_for(paths: list[str | None]) -> list[str]:
    """Short names of watched texts: the file's stem, or parent/stem when stems repeat (input.txt, input.txt)."""
    stems = [DEFAULT_CORPUS if p is None else Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 or p is None else f"{Path(p).parent.name}/{s}" for s, p in zip(stems, paths)]


def load_corpus(path: str | None, label: str, tokenizer, val_fraction: float, text_field: str) -> Corpus:
    path = None if path == DEFAULT_CORPUS else path
    cache = TokenCache.build(read_corpus(path, text_field), tokenizer, val_fraction=val_fraction)
    if len(cache.val) < 2 or len(cache.train) < 2:
        raise TinygraftError(f"the corpus '{path or DEFAULT_CORPUS}' is too small to split into training and "
                             "validation tokens; give it more text")  # fmt: skip
    return Corpus(label, path, cache)


def watched(settings: ContinualSettings, tokenizer, data) -> list[Corpus]:
    paths = [None if p == DEFAULT_CORPUS else p for p in watch_list(settings)]
    return [load_corpus(p, label, tokenizer, data.val_fraction, data.text_field)
            for p, label in zip(paths, labels_for(paths))]  # fmt: skip


def lm_watchers(corpora: list[Corpus], objective, tokenizer, t, mask_prob, device) -> list:
    """[(label, watcher(model) -> the LM loss on the text's held-out split)] of a pre-training run."""
    out = []
    for c in corpora:
        check = objective.evaluator(c.cache.val, tokenizer, t.batch_size, min(t.seq_len, len(c.cache.val) - 1),
                                    t.eval_batches, mask_prob, device)  # fmt: skip
        out.append((c.label, lambda model, check=check: check(model)["loss"]))
    return out


def with_watched(evaluate, watchers: list):
    """`evaluate` plus each watcher's number as `watch:<label>`."""
    if not watchers:
        return evaluate

    def run(model) -> dict:
        out = evaluate(model)
        for label, watcher in watchers:
            out[PREFIX + label] = watcher(model)
        return out

    return run


def replay_corpus(settings: ContinualSettings, tokenizer, data) -> Corpus | None:
    return None if settings.replay is None else load_corpus(settings.replay, "replay", tokenizer, data.val_fraction,
                                                            data.text_field)  # fmt: skip


def replay_batcher(settings: ContinualSettings, old: Corpus | None, batcher, objective, tokenizer, t, mask_prob):
    """The run's batcher with --replay's rows mixed in, or the batcher itself."""
    if old is None:
        return batcher
    # Another seed than the new data's: the two windows' positions must not move in step.
    replay = objective.batcher(old.cache.train, t.batch_size, t.seq_len, tokenizer, t.seed + 1, mask_prob)
    return ReplayMix(batcher, replay, settings.replay_ratio, t.batch_size)


def source_corpus(source) -> str | None:
    """The training corpus of a --from tinygraft pre-training run (None: the default corpus); refused otherwise."""
    loaded = getattr(source, "loaded", None)
    if loaded is None or loaded.run is None:
        raise TinygraftError(
            f"--ewc needs --ewc-data: '{source.path}' is not a tinygraft pre-training run, so the corpus it learned "
            "from is unknown"
        )
    step_dir = loaded.ckpt.path if loaded.ckpt is not None else None
    run_dir = step_dir.parent.parent if step_dir is not None and step_dir.parent.name == "checkpoints" else None
    corpus = loaded.run.data.corpus
    return str(run_dir / corpus) if corpus and run_dir is not None and not Path(corpus).is_absolute() else corpus


def make_ewc(settings: ContinualSettings, model, method, source, objective, tokenizer, run, device, say) -> EWC | None:
    """EWC's Fisher on the old corpus and its anchor (the starting weights), before any adapter is attached."""
    if settings.ewc == 0:
        return None
    check_method(method)
    if source is None:
        raise TinygraftError("--ewc keeps the weights a run starts --from; a model built from a preset has none")
    t, data = run.train, run.data
    path = settings.ewc_data if settings.ewc_data is not None else source_corpus(source)
    old = load_corpus(path, "ewc", tokenizer, data.val_fraction, data.text_field)
    batcher = objective.batcher(old.cache.train, 1, min(t.seq_len, len(old.cache.train) - 1), tokenizer, t.seed,
                                data.mask_prob)  # fmt: skip
    say(f"EWC: the Fisher of {settings.ewc_samples} sequences of '{path or DEFAULT_CORPUS}'")
    model.to(device)
    batches = (to_device(batcher.next(), device) for _ in range(settings.ewc_samples))
    fisher = fisher_diagonal(model, objective.loss, batches)
    anchor = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in fisher}
    return EWC(settings.ewc, fisher, anchor)


def forgetting_results(before: dict | None, corpora: list[Corpus], own: str | None, measure: dict | None = None):
    """What results.json says of forgetting: the watched texts' labels and paths, what each measures (the LM loss,
    or the features' CKA with the starting model's) and every metric at the start."""
    return {
        "own": own or DEFAULT_CORPUS,
        "watched": {c.label: c.path or DEFAULT_CORPUS for c in corpora},
        "measure": measure or {c.label: "loss" for c in corpora},
        "before": before,
    }


# ------------------------------------------------------------------------------------------ fine-tuning's watch
def windows(val, tokenizer, length: int, limit: int = 256) -> torch.Tensor:
    """Up to `limit` non-overlapping windows of the held-out tokens, (n, length)."""
    n = min(limit, len(val) // length)
    return torch.as_tensor(np.asarray(val[: n * length], dtype=np.int64)).view(n, length)


class FeatureDrift:
    """A BERT backbone's pooled features on a watched text against the starting model's: the debiased linear CKA
    between the two (1: the same representation up to rotation and scale; toward 0: the text is seen anew)."""

    def __init__(self, backbone, ids: torch.Tensor, batch_size: int, device):
        if ids.shape[0] < 4:
            raise TinygraftError("a watched text needs at least 4 windows of held-out tokens for CKA; give more text")
        self.ids, self.batch_size, self.device = ids, batch_size, device
        self.start = self.features(backbone.to(device))

    @torch.no_grad()
    def features(self, backbone) -> torch.Tensor:
        was = backbone.training
        backbone.eval()
        out = []
        for i in range(0, self.ids.shape[0], self.batch_size):
            ids = self.ids[i : i + self.batch_size].to(self.device)
            mask = torch.ones_like(ids)
            hidden, _ = token_states(backbone, ids, mask, torch.zeros_like(ids))
            out.append(pool(hidden.float(), mask, "mean").cpu())
        backbone.train(was)
        return torch.cat(out)

    def __call__(self, model) -> float:
        sim = LayerSimilarity()
        sim.add([self.start], [self.features(getattr(model, "_orig_mod", model).backbone)])
        return float(sim.cka()[0, 0])


def finetune_watchers(settings, backbone, tokenizer, max_length: int, batch_size: int, device):
    """([(label, watcher(model) -> float)], {label: "loss" | "cka"}, the corpora) of a fine-tuning run's watched
    texts: a GPT backbone's LM loss through its tied head, a BERT's feature drift (no LM head to score text with)."""
    corpora = watched(settings, tokenizer, DataConfig())
    checks, measure = [], {}
    for c in corpora:
        if isinstance(backbone, GPT):
            seq = min(max_length, backbone.config.block_size, len(c.cache.val) - 1)
            check = objective_for("gpt").evaluator(c.cache.val, tokenizer, batch_size, seq, 20, 0.0, device)
            lm = lambda model, check=check: check(getattr(model, "_orig_mod", model).backbone)["loss"]  # noqa: E731
            checks.append((c.label, lm))
            measure[c.label] = "loss"
        else:
            body = windows(c.cache.val, tokenizer, max_length - 2)
            n = body.shape[0]
            ids = torch.cat([torch.full((n, 1), tokenizer.cls_id), body, torch.full((n, 1), tokenizer.sep_id)], 1)
            checks.append((c.label, FeatureDrift(backbone, ids, batch_size, device)))
            measure[c.label] = "cka"
    return checks, measure, corpora
