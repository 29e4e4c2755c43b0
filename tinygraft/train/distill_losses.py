"""The losses of distillation beside the soft labels, and the taps that read a model's insides for them.

    Tap(model, layers, relations)   forward hooks for one forward: `hidden[i]` = the embeddings' output (i = 0) or
                                    block i's (1-based); `qkv` = the last block's queries, keys and values; `final`
                                    = what goes into the output layer (the LM head, for the vocabulary-wide KD)
    hidden_loss     MSE or 1 - cosine between teacher and (projected) student states, over real tokens
    relation_loss   MiniLM's self-attention and value relations (Wang et al. 2020), in `heads` relation heads so
                    teacher and student may differ in head count and width (MiniLMv2's split)
    output_loss     each task's distillation of its outputs: class logits by the divergence, regression by MSE,
                    multi-label by BCE against the teacher's sigmoid, similarity by cosine + MSE of the embeddings

Hooks, not a second code path through the models: the blocks run as in training (LoRA, dropout, checkpointing),
and the hooks are removed when the forward ends, so a backward's recomputation stores nothing.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.kernels.kd_loss import kd_divergence
from tinygraft.models.bert import BERT, BERTForMaskedLM
from tinygraft.models.gpt import GPT


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers (several processes: train/parallel.py)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model.module, "_orig_mod", model.module)
    return model


def core_of(model: nn.Module) -> nn.Module:
    """The GPT or BERT inside a model (a TaskModel's backbone, a masked LM's encoder, torch.compile's wrapper)."""
    model = unwrap(model)
    model = getattr(model, "backbone", model)
    model = model.bert if isinstance(model, BERTForMaskedLM) else model
    if not isinstance(model, (GPT, BERT)):
        raise TinygraftError(f"distillation reads the blocks of a tinygraft GPT or BERT, not a {type(model).__name__}")
    return model


def blocks_of(model: nn.Module) -> nn.ModuleList:
    core = core_of(model)
    return core.transformer.h if isinstance(core, GPT) else core.encoder.layer


def n_layers(model: nn.Module) -> int:
    return len(blocks_of(model))


def width_of(model: nn.Module) -> int:
    return core_of(model).config.n_embd


class Tap:
    """Forward hooks for one forward pass (a context manager); see the module docstring."""

    def __init__(self, model: nn.Module, layers=(), relations: bool = False, final: nn.Module | None = None):
        self.hidden: dict[int, torch.Tensor] = {}
        self.qkv: tuple[torch.Tensor, ...] | None = None
        self.final: torch.Tensor | None = None
        self.handles = []
        blocks = blocks_of(model)
        for i in sorted(set(layers)):
            if i == 0:
                self._on(blocks[0].register_forward_pre_hook(lambda m, args: self._keep(0, args[0])))
            else:
                self._on(blocks[i - 1].register_forward_hook(lambda m, a, out, i=i: self._keep(i, out)))
        if relations:
            last = blocks[-1]
            if isinstance(core_of(model), GPT):
                self._on(last.attn.c_attn.register_forward_hook(self._fused_qkv))
            else:
                parts = last.attention.self
                self._parts = {}
                for name in ("query", "key", "value"):
                    self._on(getattr(parts, name).register_forward_hook(lambda m, a, out, n=name: self._part(n, out)))
        if final is not None:
            self._on(final.register_forward_pre_hook(lambda m, args: setattr(self, "final", args[0])))

    def _on(self, handle) -> None:
        self.handles.append(handle)

    def _keep(self, i: int, x: torch.Tensor) -> None:
        self.hidden[i] = x

    def _fused_qkv(self, module, args, out) -> None:
        self.qkv = tuple(out.split(out.shape[-1] // 3, dim=-1))

    def _part(self, name: str, out) -> None:
        self._parts[name] = out
        if len(self._parts) == 3:
            self.qkv = (self._parts["query"], self._parts["key"], self._parts["value"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


# ------------------------------------------------------------------------------------------------ hidden states
def parse_layer_map(text: str | None, n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """'0:0,6:3' -> [(0, 0), (6, 3)]; None -> the uniform map 0:0 and student block j from teacher block
    round(j * n_teacher / n_student) (TinyBERT's), so the last blocks pair up."""
    if text is None:
        return [(0, 0)] + [(round(j * n_teacher / n_student), j) for j in range(1, n_student + 1)]
    pairs = []
    for part in text.split(","):
        try:
            t, s = (int(x) for x in part.split(":"))
        except ValueError:
            raise TinygraftError(f"--layer-map takes TEACHER:STUDENT pairs like 0:0,6:3; got {part!r}") from None
        for who, i, n in (("teacher", t, n_teacher), ("student", s, n_student)):
            if not 0 <= i <= n:
                raise TinygraftError(
                    f"--layer-map {part}: the {who} has layers 0 (the embeddings' output) to {n}, not {i}"
                )
        pairs.append((t, s))
    if not pairs:
        raise TinygraftError("--layer-map names no layer pair")
    return pairs


def hidden_loss(h_t: torch.Tensor, h_s: torch.Tensor, mask: torch.Tensor | None, kind: str = "mse") -> torch.Tensor:
    """Mean over real tokens (mask 1) of the MSE over the width, or of 1 - cosine; h_s already projected."""
    if h_t.shape != h_s.shape:
        raise TinygraftError(f"hidden states of shapes {tuple(h_t.shape)} and {tuple(h_s.shape)} cannot be compared")
    h_t, h_s = h_t.float(), h_s.float()
    per_token = ((h_s - h_t) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(h_s, h_t, dim=-1)
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------- relations
def relations(x: torch.Tensor, y: torch.Tensor, heads: int, key_mask: torch.Tensor | None, causal: bool):
    """log softmax over keys of the scaled dot products of x's rows with y's, split into `heads` relation heads:
    (B, T, C) x 2 -> (B, heads, T, T)."""
    B, T, C = x.shape
    d = C // heads
    xs = x.float().view(B, T, heads, d).transpose(1, 2)
    ys = y.float().view(B, T, heads, d).transpose(1, 2)
    scores = xs @ ys.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), -1), allowed


def relation_kl(log_t: torch.Tensor, log_s: torch.Tensor, allowed: torch.Tensor, query_mask) -> torch.Tensor:
    """KL(teacher || student) over keys, mean over relation heads and real query rows."""
    p = log_t.exp()
    terms = torch.where(allowed, p * (log_t - log_s), torch.zeros_like(p)).sum(-1)  # (B, H, T)
    if query_mask is None:
        return terms.mean()
    m = query_mask.to(terms.dtype)[:, None, :].expand_as(terms)
    return (terms * m).sum() / m.sum().clamp(min=1)


def relation_loss(qkv_t, qkv_s, heads: int, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """MiniLM's last-layer transfer: KL of the attention distributions (Q K^T) plus KL of the value relations
    (V V^T), both in `heads` relation heads."""
    (qt, kt, vt), (qs, ks, vs) = qkv_t, qkv_s
    total = 0.0
    for (xt, yt), (xs, ys) in (((qt, kt), (qs, ks)), ((vt, vt), (vs, vs))):
        log_t, allowed = relations(xt, yt, heads, mask, causal)
        log_s, _ = relations(xs, ys, heads, mask, causal)
        total = total + relation_kl(log_t, log_s, allowed, mask)
    return total


def relation_heads(requested: int | None, width_t: int, width_s: int, student_heads: int) -> int:
    heads = requested or student_heads
    if width_t % heads or width_s % heads:
        raise TinygraftError(
            f"{heads} relation heads do not divide the widths (teacher {width_t}, student {width_s}); "
            "set distill.relation_heads to a common divisor"
        )
    return heads


# ----------------------------------------------------------------------------------------------- task outputs
def output_loss(head, out_s: dict, out_t: dict, batch: dict, temperature: float, divergence: str, beta: float,
                project=None) -> torch.Tensor:  # fmt: skip
    """The soft-label loss of one task's outputs (see the module docstring); T^2 is inside kd_divergence."""
    kd = lambda s, t, mask=None: kd_divergence(s, t, temperature, divergence, beta, mask)  # noqa: E731
    if "logits" in out_s and hasattr(head, "problem"):  # classify
        s, t = out_s["logits"].float(), out_t["logits"].float()
        if head.problem == "single_label":
            return kd(s, t)
        if head.problem == "multi_label":
            return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))
        return F.mse_loss(s, t)
    if "start_logits" in out_s:  # qa: a distribution over the positions, padding masked out
        mask = batch["attention_mask"].bool()
        fill = lambda x: x.float().masked_fill(~mask, -1e4)  # noqa: E731
        return (kd(fill(out_s["start_logits"]), fill(out_t["start_logits"]))
                + kd(fill(out_s["end_logits"]), fill(out_t["end_logits"]))) / 2  # fmt: skip
    if "embeddings_a" in out_s:  # similarity: the pooled embeddings themselves
        total = 0.0
        for side in ("embeddings_a", "embeddings_b"):
            s, t = out_s[side], out_t[side].float()
            s = F.normalize(project(s) if project is not None else s, dim=-1)
            total = total + (1 - F.cosine_similarity(s, t, dim=-1)).mean() + F.mse_loss(s, t)
        return total / 2
    if "logits" in out_s:  # tokens: a distribution per labelled token
        mask = batch["labels"] != -100
        return kd(out_s["logits"], out_t["logits"], mask)
    raise TinygraftError(f"no distillation loss for the outputs {sorted(out_s)} of {type(head).__name__}")
