"""Fine-tuning methods: which parts of a pretrained `TaskModel` train, when, and at which learning rate.

A model is cut into *units*, top first (the order every method below counts in):

    unit 0          the task head and what sits above the last block (GPT's final `ln_f`, BERT's pooler)
    unit 1 .. L     the transformer blocks, the top block first (unit 1 = block L-1, unit L = block 0)
    unit L + 1      the embeddings (GPT: wte, wpe; BERT: word, position, token-type embeddings and their LayerNorm)

    full              every unit trains
    linear-probe      the head only (not the pooler / ln_f of unit 0); the backbone is frozen *and* kept in eval
                      mode (no dropout), so its output is the fixed feature map a probe measures (Alain & Bengio,
                      2016); every backbone tensor stays bit-identical
    top-k             units 0 .. k: the head plus the last k blocks (`--top-k K`)
    gradual-unfreeze  ULMFiT (Howard & Ruder, 2018): unit 0 trains first, then one more unit every `every` steps
                      (the fine-tuning job sets `every` to one epoch unless told), top first, until all train
    --layer-lr-decay  discriminative learning rates (ULMFiT's factor 1/2.6; ELECTRA's layer-wise decay 0.8): unit u
                      runs at lr * decay**u, so the head at lr, the top block at lr * decay, ..., the embeddings at
                      the lowest rate, lr * decay**(L+1). Combines with every method above.

Each method is a `train.methods.Method` plugin (attach / param_groups / apply_schedule / state_dict): the loop
freezes whatever no group lists; gradual unfreezing lists every unit from the start (in one group, or one group
per unit with --layer-lr-decay) and flips `requires_grad` in `apply_schedule`, which the loop calls with
the step about to run, also after a resume: the state it sets depends only on the step. A frozen parameter has no
`.grad`, so AdamW leaves it untouched (no update, no weight decay, no state) until it unfreezes.

`make_method(name, **settings)` builds one by name: full, linear-probe, top-k (or top-K, e.g. top-2),
gradual-unfreeze, lora (tinygraft/train/lora_method.py's `LoRAMethod`, imported when asked for).
"""

from __future__ import annotations

import re

from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.train.methods import Method

# Learning rates each method starts from unless --lr / --lr-for says otherwise. Full fine-tuning moves every weight
# a little (BERT's paper: 2e-5..5e-5); fewer trainable weights need bigger steps to move as far in the same budget;
# a fresh linear head on frozen features is a logistic regression, which wants a large rate; LoRA's B starts at
# zero (issue 9: peft LoRA at 5e-4 for one epoch of SST-2 is under-trained, 0.759 against full's 0.822).
DEFAULT_LR = {
    "full": 5e-5,
    "top-k": 1e-4,
    "gradual-unfreeze": 1e-4,
    "linear-probe": 3e-3,
    "lora": 1e-3,
}
NAMES = ("full", "linear-probe", "top-k", "gradual-unfreeze", "lora")
TOP_K = re.compile(r"^top-(\d+)$")


# ----------------------------------------------------------------------------------------------------- units
def units(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """[(name, parameters)] of a TaskModel, top first (see the module docstring); tied tensors listed once."""
    if not hasattr(model, "backbone") or not hasattr(model, "head"):
        raise TinygraftError(f"fine-tuning methods need a TaskModel (backbone + head), got {type(model).__name__}")
    bb = model.backbone
    if model.family == "gpt":
        top, embeddings = [bb.transformer.ln_f], [bb.transformer.wte, bb.transformer.wpe]
    else:
        top, embeddings = ([bb.pooler] if bb.pooler is not None else []), [bb.embeddings]
    blocks = list(model.blocks)
    out = [("head", [model.head, *top])]
    out += [(f"block{i}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    out.append(("embeddings", embeddings))
    seen: set[int] = set()
    result = []
    for name, modules in out:
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
    return result


def unit_names(model: nn.Module) -> list[str]:
    return [name for name, _ in units(model)]


# --------------------------------------------------------------------------------------------------- methods
class BlockMethod(Method):
    """Trains units 0 .. n_trainable(step) - 1, each in its own optimizer group scaled by layer_lr_decay**u."""

    name = "block"

    def __init__(self, layer_lr_decay: float | None = None):
        if layer_lr_decay is not None and not 0.0 < layer_lr_decay <= 1.0:
            raise TinygraftError(f"--layer-lr-decay must be in (0, 1], got {layer_lr_decay}")
        self.layer_lr_decay = layer_lr_decay

    def n_trainable(self, n_units: int, step: int | None) -> int:
        """Units (from the top) that train at `step`; `step=None`: the most that ever train."""
        return n_units

    def lr_scale(self, unit: int) -> float:
        return 1.0 if self.layer_lr_decay is None else self.layer_lr_decay**unit

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        self.apply_schedule(model, 0)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        us = units(model)
        listed = us[: self.n_trainable(len(us), None)]
        if self.layer_lr_decay is None:  # one lr: one group (fewer groups, fewer per-group optimizer launches)
            return [{"params": [p for _, ps in listed for p in ps], "lr_scale": 1.0, "name": "trainable"}]
        return [{"params": ps, "lr_scale": self.lr_scale(u), "name": name} for u, (name, ps) in enumerate(listed)]

    def apply_schedule(self, model: nn.Module, step: int) -> None:
        us = units(model)
        n = self.n_trainable(len(us), step)
        for u, (_, ps) in enumerate(us):
            for p in ps:
                p.requires_grad_(u < n)

    def describe(self) -> dict:
        return {"method": self.name, "layer_lr_decay": self.layer_lr_decay}


class FullFinetune(BlockMethod):
    """Every parameter trains (with --layer-lr-decay: at a rate falling block by block down to the embeddings)."""

    name = "full"


class LinearProbe(BlockMethod):
    """Only the head trains; the backbone is frozen and in eval mode, so dropout never touches its features.

    With `cache_features` a pooling head (classify, similarity) reads each example's pooled features from a cache
    after the backbone's first pass over it (models/heads.py: PooledCache): epoch 2 on costs the head alone.
    """

    name = "linear-probe"

    def __init__(self, layer_lr_decay: float | None = None, cache_features: bool = True):
        super().__init__(layer_lr_decay)
        self.cache_features = cache_features

    def attach(self, model: nn.Module) -> nn.Module:
        model = super().attach(model)
        pooling = getattr(model.head, "pooling", None)
        if self.cache_features and pooling is not None and hasattr(model, "pooled_cache"):
            from tinygraft.models.heads import PooledCache

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

    def __init__(self, k: int = 2, layer_lr_decay: float | None = None):
        super().__init__(layer_lr_decay)
        if k < 0:
            raise TinygraftError(f"--top-k must be at least 0, got {k}")
        self.k = k

    def n_trainable(self, n_units, step):
        if self.k > n_units - 2:
            raise TinygraftError(f"--top-k {self.k} asks for more blocks than the model's {n_units - 2}")
        return 1 + self.k

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k}


class GradualUnfreeze(BlockMethod):
    """ULMFiT: the head alone for `every` steps, then one more unit (top first) every `every` steps."""

    name = "gradual-unfreeze"

    def __init__(self, every: int | None = None, layer_lr_decay: float | None = None):
        super().__init__(layer_lr_decay)
        if every is not None and every < 1:
            raise TinygraftError(f"--unfreeze-every must be at least 1 step, got {every}")
        self.every = every
        self.first = 1  # units training from step 0

    def attach(self, model: nn.Module) -> nn.Module:
        # A head without parameters (the bi-encoder's cosine) gives the first stage nothing to train: start with the
        # top block beside it.
        self.first = 1 if any(p.numel() for p in model.head.parameters()) else 2
        return super().attach(model)

    def n_trainable(self, n_units, step):
        if step is None:
            return n_units
        if self.every is None:
            raise TinygraftError("gradual-unfreeze needs --unfreeze-every (steps between unfreezing two groups)")
        return min(n_units, self.first + step // self.every)

    def schedule(self, model: nn.Module, steps: int) -> list[tuple[int, str]]:
        """[(first step it trains at, unit name)] within a run of `steps` steps: what the flags say, for the log."""
        names = unit_names(model)
        starts = [max(0, u - self.first + 1) * self.every for u in range(len(names))]
        return [(s, name) for s, name in zip(starts, names) if s < steps]

    def describe(self) -> dict:
        return {**super().describe(), "every": self.every}


# ----------------------------------------------------------------------------------------------------- registry
def canonical(name: str) -> tuple[str, dict]:
    """'top-2' -> ('top-k', {'k': 2}); other names as they are (unknown ones are an error naming the known)."""
    m = TOP_K.match(name)
    if m:
        return "top-k", {"k": int(m.group(1))}
    if name not in NAMES:
        raise TinygraftError(f"unknown method {name!r}; known: {', '.join(NAMES)} (top-k also as top-K, e.g. top-2)")
    return name, {}


def default_lr(name: str) -> float:
    return DEFAULT_LR[canonical(name)[0]]


def make_method(name: str, **settings) -> Method:
    """A method by name. Settings it does not use are ignored, so one dict of CLI settings serves every method:

    layer_lr_decay (all but lora), k (top-k), every (gradual-unfreeze), cache_features (linear-probe), r / alpha /
    dropout / targets / use_rslora (lora).
    """
    name, implied = canonical(name)
    s = {**settings, **implied}
    decay = s.get("layer_lr_decay")
    if name == "full":
        return FullFinetune(decay)
    if name == "linear-probe":
        return LinearProbe(decay, s.get("cache_features", True))
    if name == "top-k":
        return TopK(2 if s.get("k") is None else int(s["k"]), decay)
    if name == "gradual-unfreeze":
        return GradualUnfreeze(s.get("every"), decay)
    try:
        from tinygraft.train.lora_method import LoRAMethod
    except ImportError:
        raise TinygraftError(
            "method 'lora' needs tinygraft/train/lora_method.py (class LoRAMethod), which this install lacks"
        ) from None
    if decay is not None:
        raise TinygraftError("--layer-lr-decay does not apply to lora (the adapters are not a stack of blocks)")
    lora = {k: s[k] for k in ("r", "alpha", "dropout", "targets", "use_rslora") if s.get(k) is not None}
    return LoRAMethod(**lora)  # adapters on the backbone; a TaskModel's head trains whole and is saved with them


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied tensors once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
