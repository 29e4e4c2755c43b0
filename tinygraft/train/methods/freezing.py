"""The freezing family: which parts of a pretrained model train, when, and at which learning rate.

A model is cut into *units*, top first (the order every method below counts in):

    unit 0          a TaskModel's head and what sits above the last block (GPT's final `ln_f`, BERT's pooler); for a
                    language model being pre-trained further, its own head (GPT's `ln_f`, BERT's masked-LM transform)
    unit 1 .. L     the transformer blocks, the top block first (unit 1 = block L-1, unit L = block 0)
    unit L + 1      the embeddings (GPT: wte, wpe; BERT: word, position, token-type embeddings and their LayerNorm);
                    an output layer tied to the word embeddings is the embeddings

    full              every unit trains
    linear-probe      the head only (not the pooler / ln_f of unit 0); the backbone is frozen *and* kept in eval
                      mode (no dropout), so its output is the fixed feature map a probe measures (Alain & Bengio,
                      2016); every backbone tensor stays bit-identical; a classify head over cached features is
                      fitted to convergence rather than stepped (train/probe_fit.py)
    top-k             units 0 .. k: the head plus the last k blocks (`--top-k K`, or the method named top-K)
    gradual-unfreeze  ULMFiT (Howard & Ruder, 2018): unit 0 trains first, then one more unit every `every` steps
                      (one epoch unless told, or steps / units when the run is shorter), top first, until all train
    --layer-lr-decay  discriminative learning rates (ULMFiT's factor 1/2.6; ELECTRA's layer-wise decay 0.8): unit u
                      runs at lr * decay**u, so the head at lr, the top block at lr * decay, ..., the embeddings at
                      the lowest rate, lr * decay**(L+1). Combines with every method above.

Gradual unfreezing lists every unit from the start (in one group, or one group per unit with --layer-lr-decay) and
flips `requires_grad` in `apply_schedule`, which the loop calls with the step about to run, also after a resume:
the state it sets depends only on the step. A frozen parameter has no `.grad`, so AdamW leaves it untouched (no
update, no weight decay, no state) until it unfreezes.
"""

import math
import re
from dataclasses import dataclass

from torch import nn

from tinygraft.core.config import setting
from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT
from tinygraft.models.heads import PooledCache, TaskModel
from tinygraft.train.methods.base import Method

LAYER_LR_DECAY_HELP = "discriminative lr: factor per block going down (e.g. 0.8, or 0.385 = ULMFiT's 1/2.6)"


# ----------------------------------------------------------------------------------------------------- units
def _parts(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(unit 0's modules, the blocks bottom first, the embeddings' modules)."""
    if isinstance(model, TaskModel):
        bb = model.backbone
        if model.family == "gpt":
            return [model.head, bb.transformer.ln_f], list(bb.transformer.h), [bb.transformer.wte, bb.transformer.wpe]
        return [model.head, *([bb.pooler] if bb.pooler is not None else [])], list(bb.encoder.layer), [bb.embeddings]
    if isinstance(model, GPT):
        return [model.transformer.ln_f], list(model.transformer.h), [model.transformer.wte, model.transformer.wpe]
    if isinstance(model, BERTForMaskedLM):
        return [model.cls], list(model.bert.encoder.layer), [model.bert.embeddings]
    if isinstance(model, BERT):
        return [m for m in [model.pooler] if m is not None], list(model.encoder.layer), [model.embeddings]
    raise TinygraftError(
        f"the freezing methods cut a GPT, a BERT or a TaskModel into blocks, not a {type(model).__name__}"
    )


def units(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """[(name, parameters)] top first (see the module docstring); a tied tensor belongs to the lowest unit."""
    top, blocks, embeddings = _parts(model)
    bottom_first = [("embeddings", embeddings)] + [(f"block{i}", [b]) for i, b in enumerate(blocks)] + [("head", top)]
    seen: set[int] = set()
    result = []
    for name, modules in bottom_first:
        params = []
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        result.append((name, params))
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:  # a module the split does not know (a new model part) must not silently freeze
        raise TinygraftError(f"parameter {missing[0]!r} belongs to no block group; the unit split needs updating")
    return result[::-1]


def unit_names(model: nn.Module) -> list[str]:
    return [name for name, _ in units(model)]


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class BlockSettings:
    layer_lr_decay: float | None = setting(None, LAYER_LR_DECAY_HELP)

    def __post_init__(self):
        if self.layer_lr_decay is not None and not 0.0 < self.layer_lr_decay <= 1.0:
            raise TinygraftError(f"--layer-lr-decay must be in (0, 1], got {self.layer_lr_decay}")


@dataclass
class LinearProbeSettings(BlockSettings):
    feature_cache: bool = setting(
        True, "linear-probe: read each example's pooled features from a cache after the frozen backbone's first pass"
    )
    probe_epochs: int | None = setting(
        None, "linear-probe: train the head by this many epochs of AdamW steps instead of fitting it to convergence"
    )
    probe_l2: float | None = setting(
        None,
        "linear-probe's fit: L2 strength l, minimising mean loss + l/2 ||W||^2 (default: the features' mean squared "
        "norm / N examples, scikit-learn's LogisticRegression at C=1 on unit-norm features)",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.probe_epochs is not None and self.probe_epochs < 1:
            raise TinygraftError(f"--probe-epochs must be at least 1, got {self.probe_epochs}")
        if self.probe_l2 is not None and not (math.isfinite(self.probe_l2) and self.probe_l2 >= 0):
            raise TinygraftError(f"--probe-l2 must be a number >= 0, got {self.probe_l2}")


@dataclass
class TopKSettings(BlockSettings):
    top_k: int = setting(2, "top-k: the blocks that train, from the top")

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 0:
            raise TinygraftError(f"--top-k must be at least 0, got {self.top_k}")


@dataclass
class GradualUnfreezeSettings(BlockSettings):
    unfreeze_every: int | None = setting(
        None, "gradual-unfreeze: steps between unfreezing two groups (default: one epoch, or steps / groups if shorter)"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise TinygraftError(f"--unfreeze-every must be at least 1 step, got {self.unfreeze_every}")


# --------------------------------------------------------------------------------------------------- methods
class BlockMethod(Method):
    """Trains units 0 .. n_trainable(step) - 1, each in its own optimizer group scaled by layer_lr_decay**u."""

    Settings = BlockSettings

    def n_trainable(self, n_units: int, step: int | None) -> int:
        """Units (from the top) that train at `step`; `step=None`: the most that ever train."""
        return n_units

    def lr_scale(self, unit: int) -> float:
        decay = self.settings.layer_lr_decay
        return 1.0 if decay is None else decay**unit

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        self.apply_schedule(model, 0)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        us = units(model)
        listed = us[: self.n_trainable(len(us), None)]
        if self.settings.layer_lr_decay is None:  # one lr: one group (fewer groups, fewer optimizer launches)
            return [{"params": [p for _, ps in listed for p in ps], "lr_scale": 1.0, "name": "trainable"}]
        return [{"params": ps, "lr_scale": self.lr_scale(u), "name": name} for u, (name, ps) in enumerate(listed)]

    def apply_schedule(self, model: nn.Module, step: int) -> None:
        us = units(model)
        n = self.n_trainable(len(us), step)
        for u, (_, ps) in enumerate(us):
            for p in ps:
                p.requires_grad_(u < n)


class Full(BlockMethod):
    """Every parameter trains (with --layer-lr-decay: at a rate falling block by block down to the embeddings)."""

    name = "full"
    summary = "everything trains"
    jobs = frozenset({"pretrain", "finetune"})
    default_lr = 5e-5  # BERT's paper: 2e-5 .. 5e-5 for a few epochs
    from_lr = 1e-4  # a continued pre-training rate, not a from-scratch one

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        if self.settings.layer_lr_decay is not None:
            return super().param_groups(model)
        if not isinstance(model, TaskModel):  # the model's own order: what pre-training runs have always saved
            return [{"params": list(model.parameters()), "lr_scale": 1.0, "name": "all"}]
        return super().param_groups(model)

    def apply_schedule(self, model: nn.Module, step: int) -> None:
        pass  # nothing is scheduled: attach() turned every parameter on


class LinearProbe(BlockMethod):
    """Only the head trains; the backbone is frozen and in eval mode, so dropout never touches its features.

    With `feature_cache` a pooling head (classify, similarity) reads each example's pooled features from a cache
    after the backbone's first pass over it (models/heads.py: PooledCache): epoch 2 on costs the head alone. A
    classify head over cached features is then fitted to convergence in one pass instead of stepped (full-batch
    L-BFGS, train/probe_fit.py); `probe_epochs` or the job's --steps step it as any method.
    """

    name = "linear-probe"
    summary = "the head only, over a frozen backbone in eval mode"
    Settings = LinearProbeSettings
    default_lr = 3e-3  # a fresh linear head on frozen features is a logistic regression: a large rate

    def attach(self, model: nn.Module) -> nn.Module:
        model = super().attach(model)
        pooling = getattr(model.head, "pooling", None)
        if self.settings.feature_cache and pooling is not None:
            model.pooled_cache = PooledCache(pooling)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": list(model.head.parameters()), "lr_scale": 1.0, "name": "head"}]

    def apply_schedule(self, model: nn.Module, step: int) -> None:
        for p in model.backbone.parameters():  # the pooler / ln_f too: they belong to the pretrained feature map
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        # The loop puts the whole model in train mode at the start and after every evaluation; this hook runs
        # before every step, so the backbone is back in eval mode before any forward pass of training.
        model.backbone.eval()


class TopK(BlockMethod):
    """The head and the last k blocks train; everything below stays as pretrained."""

    name = "top-k"
    summary = "the head and the last k blocks (top-2, top-4, ...: the method name says k)"
    Settings = TopKSettings
    default_lr = 1e-4  # fewer trainable weights need bigger steps to move as far in the same budget
    alias = re.compile(r"^top-(\d+)$")

    @classmethod
    def implied(cls, match):
        return {"top_k": int(match.group(1))}

    def n_trainable(self, n_units, step):
        k = self.settings.top_k
        if k > n_units - 2:
            raise TinygraftError(f"--top-k {k} asks for more blocks than the model's {n_units - 2}")
        return 1 + k


class GradualUnfreeze(BlockMethod):
    """ULMFiT: the head alone for `every` steps, then one more unit (top first) every `every` steps."""

    name = "gradual-unfreeze"
    summary = "ULMFiT: the head first, then one more block group every --unfreeze-every steps"
    Settings = GradualUnfreezeSettings
    default_lr = 1e-4

    def __init__(self, settings=None):
        super().__init__(settings)
        self.every = self.settings.unfreeze_every
        self.first = 1  # units training from step 0

    def attach(self, model: nn.Module) -> nn.Module:
        # A head without parameters (the bi-encoder's cosine) gives the first stage nothing to train: start with the
        # top block beside it.
        self.first = 1 if any(p.numel() for p in model.head.parameters()) else 2
        return super().attach(model)

    def prepare(self, model: nn.Module, steps: int, steps_per_epoch: int) -> list[str]:
        # one unit per epoch (ULMFiT) when the budget has an epoch for each, else spread so that every unit trains
        # before the end (a one-epoch run would otherwise never leave the head)
        if self.every is None:
            self.every = min(steps_per_epoch, max(1, steps // len(units(model))))
        shown = ", ".join(f"{name}@{s}" for s, name in self.schedule(model, steps))
        return [f"gradual unfreezing (unit@first step): {shown}"]

    def n_trainable(self, n_units, step):
        if step is None:
            return n_units
        if self.every is None:
            raise TinygraftError("gradual-unfreeze needs --unfreeze-every (steps between unfreezing two groups)")
        return min(n_units, self.first + step // self.every)

    def schedule(self, model: nn.Module, steps: int) -> list[tuple[int, str]]:
        """[(first step it trains at, unit name)] within a run of `steps` steps: what the flags say, for the log."""
        first = 1 if any(p.numel() for p in model.head.parameters()) else 2
        names = unit_names(model)
        starts = [max(0, u - first + 1) * self.every for u in range(len(names))]
        return [(s, name) for s, name in zip(starts, names) if s < steps]

    def describe(self) -> dict:
        return {**super().describe(), "unfreeze_every": self.every}
