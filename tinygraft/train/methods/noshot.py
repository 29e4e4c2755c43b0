"""The no-training end of `compare`: zero-shot and few-shot classification, as methods that train nothing.

    zero-shot     BERT family: cos(the text's embedding, each label's text's embedding), both pooled the way the
                  classify head pools (MiniLM: mean, the pooling its sentence-transformers files ship; --pooling
                  picks another). GPT family: the log-likelihood of each label's text after a template,
                  log p(" " + label text | pre + text + post), --template "pre{text}post" (default "{text}\\nLabel:")
    few-shot-K    BERT: nearest prototype (prototypical networks, Snell et al. 2017): a class's prototype is the mean
                  of K of its training examples' unit-length embeddings, scored by cosine like a label's text.
                  GPT: in-context learning (Brown et al. 2020): K training examples, each written with the template
                  and its label's text, separated by blank lines, then the text to classify, scored like zero-shot

K counts per class for the prototypes (N-way K-shot, as in the prototypical networks paper) and in all for a GPT's
context (as GPT-3 counts its demonstrations), spread over the classes as evenly as the data allows. The examples
are drawn from the training set with the run's seed; results.json names them (`method_settings.examples`).

A label is scored by its text (`--label-text LABEL=TEXT`, once per label; default: the label's name). A GPT sums the
log-probabilities of the label text's tokens (`--label-score sum`, the default): that is the log-probability of the
whole text, so labels compare as the model's probabilities of them, but a label that takes more tokens pays for
each. `mean` divides by the token count (GPT-3's per-token normalisation; lm-eval-harness's acc_norm per byte): no
length penalty, but no probability either. With one token per label the two agree.

How they run through the one loop: `fit` (which finetune calls before the loop) replaces the classify head with a
fixed scoring module built from the data: the label vectors or prototypes (BERT), or the token ids of the template,
the labels and the demonstrations (GPT), all held as buffers, so the checkpoint stores them and `predict` reads them
back without the data. Nothing trains, so the job runs 0 steps: one evaluation, one checkpoint, the results
(train/loop.py); its train time is the time `fit` took. The scores are the classify head's logits (cosines, or
log-likelihoods), so the classify scorer, its metrics and `predict` read them unchanged; predict's probabilities are
a softmax over them, which ranks the labels but is no calibrated probability for cosines in [-1, 1].
"""

import random
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.core.config import setting
from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features, TaskModel, hidden_size
from tinygraft.tasks.classify import SequenceClassificationHead
from tinygraft.train.methods.base import FitData, Method

DEFAULT_TEMPLATE = "{text}\\nLabel:"  # as a command line types it: template_parts reads the \n as a newline
SEPARATOR = "\n\n"  # between a GPT's demonstrations, and before the text to classify


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class NoShotSettings:
    label_text: str | list[str] | None = setting(
        None, "zero-shot, few-shot: LABEL=TEXT, the text a label is scored by (default: its name); once per label",
        repeat=True,
    )  # fmt: skip
    template: str = setting(
        DEFAULT_TEMPLATE, "zero-shot, few-shot, GPT: the prompt around {text} (\\n is a newline); the label's text "
        "follows after a space",
    )  # fmt: skip
    label_score: Literal["sum", "mean"] = setting(
        "sum", "zero-shot, few-shot, GPT: a label's log-likelihood summed over its tokens, or their mean"
    )

    def __post_init__(self):
        label_texts(self.label_text)  # the form; the names are checked once the labels are known
        template_parts(self.template)


@dataclass
class FewShotSettings(NoShotSettings):
    shots: int = setting(4, "few-shot: examples per class (BERT's prototypes) or in all (a GPT's context)")

    def __post_init__(self):
        super().__post_init__()
        if self.shots < 1:
            raise TinygraftError(f"--shots must be at least 1, got {self.shots}")


def label_texts(value: str | list[str] | None) -> dict[str, str]:
    """{label name: text} from the --label-text values (LABEL=TEXT, split at the first '=')."""
    items = [] if value is None else [value] if isinstance(value, str) else list(value)
    out: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name or not text.strip():
            raise TinygraftError(f"--label-text {item!r} must be LABEL=TEXT, e.g. --label-text 1=positive")
        if name in out:
            raise TinygraftError(f"--label-text gives label {name!r} twice")
        out[name] = text
    return out


def template_parts(template: str) -> tuple[str, str]:
    """(the text before {text}, the text after it); a typed \\n or \\t is a newline or a tab."""
    if template.count("{text}") != 1:
        raise TinygraftError(f"--template {template!r} must hold {{text}} once, where the text to classify goes")
    pre, post = template.replace("\\n", "\n").replace("\\t", "\t").split("{text}")
    return pre, post


# ---------------------------------------------------------------------------------------------- the scorers
def scored(logits: torch.Tensor, batch: dict):
    """The classify head's (outputs, loss): the scores are its logits, so its scorer and predict read them."""
    labels = batch.get("labels")
    return {"logits": logits}, None if labels is None else F.cross_entropy(logits.float(), labels.long())


class CosineHead(nn.Module):
    """logits[b, l] = cos(pool(text b), vectors[l]): the label texts' embeddings (zero-shot) or the class prototypes
    (few-shot), pooled as the classify head it replaces pooled."""

    pair_inputs = False
    problem = "single_label"

    def __init__(self, vectors: torch.Tensor, pooling: str):
        super().__init__()
        self.pooling, self.num_labels = pooling, vectors.shape[0]
        self.register_buffer("label_vectors", F.normalize(vectors.float(), dim=-1))  # (L, C), unit length

    def forward(self, features: Features, batch: dict):
        z = F.normalize(features.pool(self.pooling).float(), dim=-1)  # (B, C)
        return scored(z @ self.label_vectors.T, batch)


class LikelihoodHead(nn.Module):
    """logits[b, l] = log p(label l's tokens | before, text b, after) under the GPT's own LM head, summed over the
    label's tokens (or their mean). `before` is the demonstrations (few-shot) and the template's start, `after` its
    end. Each (text, label) pair is one sequence, cut from the left to the model's positions (the demonstrations go
    first, the label never), so the head runs the backbone itself (`reads_tokens`, models/heads.py)."""

    reads_tokens = True
    family = "gpt"
    pair_inputs = False
    problem = "single_label"

    def __init__(self, labels: list[list[int]], before: list[int], after: list[int], mean: bool):
        super().__init__()
        self.num_labels, self.mean = len(labels), mean
        ids = torch.zeros(len(labels), max(1, *map(len, labels)), dtype=torch.long)
        for i, x in enumerate(labels):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        self.register_buffer("label_ids", ids)  # (L, M), right-padded
        self.register_buffer("label_lengths", torch.tensor([len(x) for x in labels], dtype=torch.long))  # (L,)
        self.register_buffer("before", torch.tensor(before, dtype=torch.long))
        self.register_buffer("after", torch.tensor(after, dtype=torch.long))

    def forward(self, backbone: nn.Module, batch: dict):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B, (n_labels, M), block = ids.shape[0], self.label_ids.shape, backbone.config.block_size
        lengths, rows = self.label_lengths.tolist(), []
        for b, n in enumerate(mask.sum(1).tolist()):
            prompt = torch.cat([self.before, ids[b, :n], self.after])
            rows += [torch.cat([prompt, self.label_ids[i, :m]])[-block:] for i, m in enumerate(lengths)]
        x = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B*L, T), right-padded: no real token sees a pad
        ends = torch.tensor([len(r) for r in rows], device=x.device)  # (B*L,)
        m = self.label_lengths.repeat(B)  # (B*L,) label tokens of each row
        j = torch.arange(M, device=x.device)
        valid = j[None] < m[:, None]  # (B*L, M)
        # the state at t predicts token t + 1: label token j sits at ends - m + j, so it is read at one before
        at = torch.where(valid, (ends - m)[:, None] + j[None] - 1, 0)
        hidden = backbone.hidden_states(x)  # (B*L, T, C)
        h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # (B*L, M, C): only where labels are read
        logp = backbone.lm_head(h).float().log_softmax(-1)  # (B*L, M, V)
        token = logp.gather(-1, self.label_ids.repeat(B, 1)[..., None]).squeeze(-1) * valid  # (B*L, M)
        score = token.sum(-1) / (m if self.mean else 1)
        return scored(score.view(B, n_labels), batch)


SCORERS = (CosineHead, LikelihoodHead)


# ------------------------------------------------------------------------------------------------- drawing
def draw(labels: list[int], n_classes: int, k: int, seed: int, per_class: bool) -> list[int]:
    """Indices of the training examples a few-shot run reads, drawn with `seed` alone: k of each class (per_class),
    or k in all taken from the classes in turn (in a seeded order of them), as balanced as the data allows, then
    shuffled, so no class sits all at the end of a GPT's context (its recency bias: Zhao et al. 2021)."""
    rng = random.Random(seed)
    pools = [[i for i, y in enumerate(labels) if y == c] for c in range(n_classes)]
    for pool in pools:
        rng.shuffle(pool)
    if per_class:
        return [i for pool in pools for i in pool[:k]]
    order = rng.sample(range(n_classes), n_classes)
    deepest = max(map(len, pools))
    picked = [pools[c][d] for d in range(deepest) for c in order if d < len(pools[c])][:k]
    rng.shuffle(picked)
    return picked


# --------------------------------------------------------------------------------------------------- methods
def check_task(name: str, model: nn.Module) -> None:
    head = getattr(model, "head", None)
    if isinstance(head, SCORERS):
        return
    if not isinstance(model, TaskModel) or not isinstance(head, SequenceClassificationHead):
        raise TinygraftError(f"--method {name} scores one label per text; it runs with --task classify only")
    if head.problem != "single_label":
        raise TinygraftError(f"--method {name} scores one label per text; use it with --problem single_label, "
                             f"not {head.problem}")  # fmt: skip


class NoShot(Method):
    """What zero-shot and few-shot share: nothing trains; `fit` puts a scoring head where the classify head was."""

    Settings = NoShotSettings
    trains_nothing = True

    def __init__(self, settings=None):
        super().__init__(settings)
        self.texts: dict[str, str] | None = None  # each label's text, once fitted
        self.drawn: list[dict] | None = None  # the training examples a few-shot run read

    def param_groups(self, model: nn.Module) -> list[dict]:
        check_task(self.name, model)
        return []

    def attach(self, model: nn.Module) -> nn.Module:
        check_task(self.name, model)
        if not isinstance(model.head, SCORERS):  # a run read back: the checkpoint fills the scorer's buffers
            model.head = self.empty_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def empty_head(self, model: TaskModel) -> nn.Module:
        n = model.head.num_labels
        if model.family == "gpt":
            return LikelihoodHead([[]] * n, [], [], self.settings.label_score == "mean")
        return CosineHead(torch.zeros(n, hidden_size(model.backbone)), model.head.pooling)

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
        for name, buffer in list(model.head.named_buffers()):
            saved = tensors.get(f"head.{name}")
            if saved is not None:  # how many tokens a label or a prompt takes is the run's own: take its shapes
                setattr(model.head, name, torch.empty(saved.shape, dtype=saved.dtype, device=buffer.device))
        return super().load_state_dict(model, tensors)

    def fit(self, model: nn.Module, data: FitData) -> list[str]:
        check_task(self.name, model)
        given = label_texts(self.settings.label_text)
        unknown = sorted(set(given) - set(data.label_names))
        if unknown:
            raise TinygraftError(f"--label-text names label {unknown[0]!r}, which the training data does not have "
                                 f"(its labels: {', '.join(data.label_names[:20])})")  # fmt: skip
        self.texts = {n: given.get(n, n) for n in data.label_names}
        was_training = model.training
        model.to(data.device).eval()
        with torch.no_grad():
            head, notes = self.build(model, data)
        model.head = head.to(data.device)
        model.train(was_training)
        return notes

    def build(self, model: TaskModel, data: FitData) -> tuple[nn.Module, list[str]]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------- the pieces both build from
    def embed(self, model: TaskModel, features: list[dict], data: FitData) -> torch.Tensor:
        """(N, C) float32: the features through the backbone, pooled as the classify head pools."""
        out = []
        for batch in L.eval_batches(features, data.batch_size, data.pad_id):
            batch = {k: v.to(data.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out.append(model.encode(batch).pool(model.head.pooling).float())
        return torch.cat(out)

    def label_tokens(self, data: FitData, block: int) -> tuple[list[list[int]], list[int], list[int]]:
        """(each label's text's tokens after a space, the template's tokens before the text, those after it)."""
        pre, post = template_parts(self.settings.template)
        tok = data.tokenizer
        labels = [tok.encode(" " + self.texts[n]) for n in data.label_names]
        before, after = tok.encode(pre), tok.encode(post)
        if not before and not after:
            raise TinygraftError(f"--template {self.settings.template!r} puts nothing around the text; a GPT reads "
                                 "a label's first token after something (e.g. '{text}\\nLabel:')")  # fmt: skip
        empty = [n for n, ids in zip(data.label_names, labels) if not ids]
        if empty:
            raise TinygraftError(f"label {empty[0]!r}'s text is no tokens; give it one with --label-text")
        longest = max(map(len, labels))
        if longest >= block:  # the model must read the whole label after at least one token
            raise TinygraftError(f"--label-text gives a label {longest} tokens, but a GPT of {block} positions "
                                 f"scores at most {block - 1}")  # fmt: skip
        return labels, before, after

    def describe(self) -> dict:
        out = super().describe()
        if self.texts is not None:
            out["label_texts"] = self.texts
        if self.drawn is not None:
            out["examples"] = self.drawn
        return out


class ZeroShot(NoShot):
    name = "zero-shot"
    summary = "no training: cosine to each label's text (BERT) or its likelihood after --template (GPT)"

    def build(self, model, data):
        if model.family == "gpt":
            labels, before, after = self.label_tokens(data, model.backbone.config.block_size)
            return LikelihoodHead(labels, before, after, self.settings.label_score == "mean"), []
        texts = [L.Example(self.texts[n], None, None, 0) for n in data.label_names]
        vectors = self.embed(model, L.encode_classification(texts, data.tokenizer, data.max_length), data)
        return CosineHead(vectors, model.head.pooling), []


class FewShot(NoShot):
    name = "few-shot"
    summary = "no training: K examples per class as prototypes (BERT) or K in the context (GPT); few-shot-K says K"
    Settings = FewShotSettings
    alias = re.compile(r"^few-shot-(\d+)$")

    @classmethod
    def implied(cls, match):
        return {"shots": int(match.group(1))}

    def build(self, model, data):
        k, n_classes, gpt = self.settings.shots, len(data.label_names), model.family == "gpt"
        labels = [f["labels"] for f in data.train]
        picked = draw(labels, n_classes, k, data.seed, per_class=not gpt)
        lines = data.lines or list(range(len(data.train)))
        self.drawn = [{"line": lines[i], "label": data.label_names[labels[i]]} for i in picked]
        notes = []
        if gpt:
            if len(picked) < k:
                notes.append(f"few-shot: the training set holds {len(picked)} examples, fewer than the {k} asked")
            return self.context_head(model, data, picked, labels, notes), notes
        self.texts = None  # prototypes read no label text
        counts = [sum(labels[i] == c for i in picked) for c in range(n_classes)]
        short = [c for c in range(n_classes) if counts[c] < k]
        if short:
            notes.append(f"few-shot: class {data.label_names[short[0]]!r} has {counts[short[0]]} training examples, "
                         f"fewer than the {k} asked; its prototype is their mean")  # fmt: skip
        vectors = F.normalize(self.embed(model, [data.train[i] for i in picked], data), dim=-1)
        owner = torch.tensor([labels[i] for i in picked], device=vectors.device)
        prototypes = torch.stack([vectors[owner == c].mean(0) for c in range(n_classes)])  # (L, C)
        return CosineHead(prototypes, model.head.pooling), notes

    def context_head(self, model, data, picked, labels, notes) -> LikelihoodHead:
        block = model.backbone.config.block_size
        label_ids, before, after = self.label_tokens(data, block)
        sep = data.tokenizer.encode(SEPARATOR)
        context = []
        for i in picked:
            context += [*before, *data.train[i]["input_ids"], *after, *label_ids[labels[i]], *sep]
        longest = len(before) + max(len(f["input_ids"]) for f in data.train) + len(after) + max(map(len, label_ids))
        if len(context) + longest > block:
            notes.append(f"few-shot: the {len(picked)} examples take {len(context)} tokens, so with a text and a "
                         f"label they pass the model's {block} positions; each scored sequence keeps its last "
                         f"{block} tokens (the earliest examples are cut first)")  # fmt: skip
        return LikelihoodHead(label_ids, context + before, after, self.settings.label_score == "mean")
