"""The distillation loss over a vocabulary, chunked so the (tokens x vocabulary) logits never exist whole.

For N token rows, the student's final hidden states h_s (N, C_s) and LM-head weight W_s (V, C_s), the teacher's h_t
(N, C_t) and W_t (V, C_t), temperature T and the rows R kept (labels != ignore_index):

    u = h_s W_s^T / T,  q = softmax(u)          the student's tempered distribution over the V tokens
    t = h_t W_t^T / T,  p = softmax(t)          the teacher's (no gradient)
    loss = T^2 / |R| * sum over rows in R of D(p, q)

    D forward KL   KL(p || q) = sum p (log p - log q)         dD/du = q - p
    D reverse KL   KL(q || p) = sum q (log q - log p)         dD/du = q * ((log q - log p) - KL(q || p))
    D JSD(beta)    beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q
                                                               dD/du = (1 - beta) q * ((log q - log m) - KL(q || m))

(the T^2 keeps the gradients' scale as T grows, Hinton et al. 2015; JSD(beta) is GKD's, Agarwal et al. 2024). The
gradients with respect to h_s and W_s are computed inside the forward, one chunk of rows at a time:

    g = T^2 / |R| * dD/du / T            (chunk, V) in fp32, the only vocabulary-wide tensor, `chunk` rows of it
    dh_s = g W_s,   dW_s += g^T h_s

so peak memory holds two (chunk, V) fp32 blocks instead of four (N, V) ones (student and teacher logits and their
softmaxes); with GPT's tied head, dW_s reaches the token embedding through autograd. `_rows` is the PyTorch path
(the CPU's, and the reference the Triton kernel is checked against); `kd_divergence` is the same formula on logits
already computed, for small vocabularies (class logits) and for tests.

The Triton path (CUDA tensors, or TINYGRAFT_BACKEND=triton under the interpreter; kd_loss_triton.py) keeps the
matmuls in torch and replaces `_rows`: one kernel takes a chunk's two logits blocks, computes each row's D and
writes g over the student's block in place, so a chunk holds the two blocks and nothing else vocabulary-wide. On
it a head whose hidden states and weight are both bf16 multiplies in bf16 (tensor cores, half the bytes per block, as
an eager bf16 head does), so g is stored in bf16 and each chunk's dW_s term is rounded to bf16 before it joins the
fp32 sum; fp16 heads multiply in fp32 (g, about T / |R| * (q - p), underflows fp16), and fp64 stays on `_rows`.
"""

import math

import torch

from tinygraft.errors import TinygraftError
from tinygraft.kernels import backend

DIVERGENCES = ("forward", "reverse", "jsd")
IGNORE_INDEX = -100


def _check(divergence: str, temperature: float, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise TinygraftError(f"the divergence is one of {', '.join(DIVERGENCES)}, not {divergence!r}")
    if not (temperature > 0 and temperature == temperature and temperature != float("inf")):
        raise TinygraftError(f"the distillation temperature must be a positive number, got {temperature}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise TinygraftError(f"JSD's beta must be in (0, 1) (0 and 1 make the divergence vanish), got {beta}")


def _rows(divergence: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float):
    """(D per row, dD/du) for tempered log-probabilities of the student (log_q) and the teacher (log_p)."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward":
        return (p * (log_p - log_q)).sum(-1), q - p
    if divergence == "reverse":
        d = (q * (log_q - log_p)).sum(-1)
        return d, q * ((log_q - log_p) - d[:, None])
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    kl_q = (q * (log_q - log_m)).sum(-1)
    d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * kl_q
    return d, (1 - beta) * q * ((log_q - log_m) - kl_q[:, None])


def kd_divergence(student_logits, teacher_logits, temperature=1.0, divergence="forward", beta=0.5, mask=None):
    """T^2 * the mean over kept rows of D(softmax(teacher / T), softmax(student / T)), logits (..., V) already
    computed; differentiable through the student's logits by autograd."""
    _check(divergence, temperature, beta)
    V = student_logits.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = torch.log_softmax(student_logits.reshape(-1, V).to(dtype) / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.reshape(-1, V).to(dtype).detach() / temperature, -1)
    if divergence == "forward":
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif divergence == "reverse":
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    keep = torch.ones_like(d, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    n = keep.sum().clamp(min=1)
    return temperature**2 * (d * keep).sum() / n


@torch.library.custom_op("tinygraft::kd_rows", mutates_args=("logits",))
def _kd_rows_op(logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor,
                temperature: float, divergence: str, beta: float) -> torch.Tensor:  # fmt: skip
    """D per row for one chunk, `logits` overwritten with d loss / d logits (kd_loss_triton.kd_rows): opaque to
    torch.compile, which would otherwise trace into the Triton launch."""
    from tinygraft.kernels import kd_loss_triton as kt  # noqa: PLC0415 (Triton is imported only when its path runs)

    return kt.kd_rows(logits, teacher_logits, keep, scale, temperature, divergence, beta)


@_kd_rows_op.register_fake
def _(logits, teacher_logits, keep, scale, temperature, divergence, beta):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _matmul_dtype(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, fused: bool) -> torch.dtype:
    """The dtype a head's logits are computed (and, fused, g stored) in: see the module docstring."""
    return torch.bfloat16 if fused and h.dtype == w.dtype == torch.bfloat16 else dtype


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, keep, temperature, divergence, beta, chunk):
        dtype = torch.promote_types(h_s.dtype, torch.float32)
        n = keep.sum().clamp(min=1).to(dtype)
        scale = temperature**2 / n  # the mean's 1/|R| and T^2, applied per chunk so nothing is rescaled later
        loss = torch.zeros((), dtype=dtype, device=h_s.device)
        grad_h = torch.zeros_like(h_s) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_s, dtype=dtype) if ctx.needs_input_grad[1] else None
        fused = dtype == torch.float32 and backend.backend_for(h_s, w_s, h_t, w_t) == "triton"
        s_dtype, t_dtype = _matmul_dtype(h_s, w_s, dtype, fused), _matmul_dtype(h_t, w_t, dtype, fused)
        ws, wt = w_s.to(s_dtype), w_t.to(t_dtype)
        for start in range(0, h_s.shape[0], chunk):
            rows = slice(start, start + chunk)
            k = keep[rows]
            if not k.any():
                continue
            hs, ht = h_s[rows].to(s_dtype), h_t[rows].to(t_dtype)
            if fused:
                g = hs @ ws.t()  # the student's logits until the kernel writes d loss / d logits over them
                d = _kd_rows_op(g, ht @ wt.t(), k, scale, temperature, divergence, beta)
                loss = loss + d.sum() * scale
            else:
                log_q = torch.log_softmax(hs @ ws.t() / temperature, -1)
                log_p = torch.log_softmax(ht @ wt.t() / temperature, -1)
                d, du = _rows(divergence, log_q, log_p, beta)
                loss = loss + (d * k).sum() * scale
                g = du * (k[:, None] * (scale / temperature))  # d loss / d (h_s W_s^T): u = logits / T
            if grad_h is not None:
                grad_h[rows] = (g @ ws).to(h_s.dtype)
            if grad_w is not None:
                grad_w += g.t() @ hs
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place, not copied (dW is as large as the head)
        dh = grad_h.mul_(grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = grad_w.mul_(grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None


def kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss of the module docstring from hidden states (..., C) and head weights (V, C), `chunk` rows at a time;
    rows whose label is `ignore_index` contribute nothing (no labels: every row counts)."""
    _check(divergence, temperature, beta)
    if chunk < 1:
        raise TinygraftError(f"the KD loss chunk must be at least 1 row, got {chunk}")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if h_s.shape[0] != h_t.shape[0]:
        raise TinygraftError(
            f"the student has {h_s.shape[0]} token rows and the teacher {h_t.shape[0]}; they must match"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise TinygraftError(
            f"the student's head scores {student_weight.shape[0]} tokens and the teacher's {teacher_weight.shape[0]}; "
            "distilling over a vocabulary needs the same one"
        )
    if student_weight.shape[1] != h_s.shape[1] or teacher_weight.shape[1] != h_t.shape[1]:
        raise TinygraftError("each head weight must be (vocabulary, width) of its own model's hidden states")
    keep = torch.ones(h_s.shape[0], dtype=torch.bool, device=h_s.device)
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        if keep.shape[0] != h_s.shape[0]:
            raise TinygraftError(f"labels give {keep.shape[0]} rows for {h_s.shape[0]} token rows")
    return _ChunkedKD.apply(h_s, student_weight, h_t, teacher_weight.detach(), keep, float(temperature), divergence,
                            float(beta), int(chunk))  # fmt: skip
