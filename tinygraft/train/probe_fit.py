"""The linear probe at its best: the head fitted to convergence on the frozen backbone's cached features.

A linear head over a frozen backbone in eval mode is a logistic regression on fixed features, a convex problem; stepped
for the job's epochs it stops wherever the budget ends (SST-2, 4,000 sentences, one epoch of AdamW: 0.777, where the
same features fitted to convergence give 0.792; issue 21). So `linear-probe` on a classify head, by default:

    1. runs the backbone once over every training example, through the method's feature cache (models/heads.py:
       PooledCache), pooled as the head pools: X (N, C);
    2. minimises, full batch, in float64 on the CPU, from W = 0 and b = 0,

           mean_i loss(W x_i + b, y_i) + l2 / 2 * ||W||^2        loss: the head's own (softmax CE; multi-label BCE)

       by L-BFGS with a strong-Wolfe line search until max |gradient| <= GRAD_TOL (`converged`) or MAX_ITER;
    3. writes W and b into the head's classifier. The run is a run of one step, the fit (train/loop.py:
       Job.converge), which evaluates, checkpoints and reports as any other; results.json's `probe` says how it went.

Why these choices:
- The bias is not penalised (scikit-learn's lbfgs solver neither). l2 defaults to s / N, s the features' mean
  squared norm: scikit-learn's LogisticRegression(C=1) (C * sum of losses + ||W||^2 / 2, divided by C * N: this
  objective at l2 = 1 / N) on the features scaled to unit mean norm. A prior that fades as the data grows, and means
  the same at any feature scale (x -> a x, W -> W / a leaves the fit unchanged only if l2 scales by a^2). The
  issue's 0.792 is that fit on MiniLM's unit-norm sentence embeddings (0.794 measured); on the raw mean-pooled
  features (norm ~5) a plain 1 / N would regularise 27x less and give 0.774, below the stepped probe.
  AdamW's decoupled weight decay is no L2 strength (its pull depends on the lr and the steps), so it is not reused.
- The features are centred for the fit: W x + b = W (x - m) + (b + W m), the same optimum of a better-conditioned
  problem. Softmax logits are defined only up to a shift shared by the classes; the bias gradient sums to 0 over them,
  so from b = 0 the fitted bias stays centred and the fit is unique. Nothing is random: every seed fits the same head.
- Dropout before the classifier is left out: the fitted objective is the deterministic one the head is evaluated on.

Everywhere else the probe steps as before, and the run says why (`why_steps`).
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.data import labeled as L
from tinygraft.tasks.classify import SequenceClassificationHead
from tinygraft.train.loop import to_device
from tinygraft.train.methods.freezing import LinearProbe

F64 = torch.float64
GRAD_TOL = 1e-8  # max |d objective / d parameter| at which the fit has converged (the loss is a mean, O(1) at W = 0)
MAX_ITER = 2000  # L-BFGS iterations at most (SST-2's 4,000 x 384 MiniLM features converge in a few hundred)


# ----------------------------------------------------------------------------------------------- the decision
def why_steps(method, steps_given: bool, head: nn.Module, distilling: bool) -> str | None:
    """Why a linear probe trains by optimizer steps instead of the fit, or None when it is fitted."""
    s = method.settings
    if steps_given:
        return "--steps asks for a number of AdamW steps"
    if s.probe_epochs is not None:
        return f"--probe-epochs {s.probe_epochs} asks for epochs of AdamW steps"
    if not s.feature_cache:
        return "--no-feature-cache leaves no cached features to fit on"
    if distilling:
        return "a distilled student's loss holds the teacher's terms, which the fit does not"
    if not isinstance(head, SequenceClassificationHead) or head.problem == "regression":
        return "the fit covers the classify task's single- and multi-label heads only; other heads step"
    return None


@dataclass
class ProbePlan:
    """How a linear-probe run trains its head: fitted (`fits`), or stepped for `epochs` (None: the job's steps)."""

    fits: bool
    why: str | None  # why it steps, when it does
    epochs: int | None
    l2: float | None  # as given; None: default_l2
    steps_given: bool  # --steps, which wins over --probe-epochs as it does over --epochs

    def steps(self, job_steps: int, steps_per_epoch: int) -> int:
        if self.fits:
            return 1  # the fit is the run's one step
        if self.epochs is not None and not self.steps_given:
            return self.epochs * steps_per_epoch
        return job_steps

    def message(self, n_train: int) -> str:
        if self.fits:
            l2 = f"l2 {self.l2:g}" if self.l2 is not None else "l2 = mean squared feature norm / N"
            return (
                f"linear-probe: the head is fitted to convergence on the cached features of the {n_train} "
                f"training examples (full-batch L-BFGS in float64, {l2}); --probe-epochs N steps it instead"
            )
        return f"linear-probe trains its head by AdamW steps: {self.why}"


def plan(method, steps_given: bool, head: nn.Module, distilling: bool) -> ProbePlan | None:
    """The plan of a linear-probe run; None for any other method."""
    if not isinstance(method, LinearProbe):
        return None
    why = why_steps(method, steps_given, head, distilling)
    return ProbePlan(why is None, why, method.settings.probe_epochs, method.settings.probe_l2, steps_given)


# ------------------------------------------------------------------------------------------------ the features
@torch.no_grad()
def pooled_features(model: nn.Module, features: list[dict], batch_size: int, pad_id: int):
    """(X (N, C) float32 on the CPU, targets (N,) or (N, L), tokens read): every example pooled as the head pools,
    through the model's feature cache when it has one."""
    device = next(model.parameters()).device
    model.backbone.eval()
    xs, ys, tokens = [], [], 0
    for batch in L.eval_batches(features, batch_size, pad_id):
        batch = to_device(batch, device)
        xs.append(model.encode(batch).pool(model.head.pooling).float().cpu())
        ys.append(batch["labels"].cpu())
        tokens += L.count_tokens(batch)
    return torch.cat(xs), torch.cat(ys), tokens


# ----------------------------------------------------------------------------------------------------- the fit
@dataclass
class Fit:
    weight: torch.Tensor  # (L, C) float64, nn.Linear's layout
    bias: torch.Tensor  # (L,)
    iterations: int
    converged: bool  # max |gradient| <= the tolerance
    grad_max: float  # max |gradient| at the end
    grad_norm: float
    objective: float  # mean loss + l2 / 2 ||W||^2
    loss: float  # the mean loss alone


def objective_terms(problem: str):
    """The head's loss of (logits, targets), as SequenceClassificationHead computes it."""
    if problem == "single_label":
        return lambda z, y: F.cross_entropy(z, y.long())
    return lambda z, y: F.binary_cross_entropy_with_logits(z, y.to(z.dtype))


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    n_labels: int,
    problem: str,
    l2: float,
    grad_tol: float = GRAD_TOL,
    max_iter: int = MAX_ITER,
) -> Fit:
    """The linear head minimising the module docstring's objective over features (N, C) and targets."""
    x = x.to(F64)
    mean = x.mean(0)
    z = x - mean
    w = torch.zeros(n_labels, x.shape[1], dtype=F64, requires_grad=True)
    c = torch.zeros(n_labels, dtype=F64, requires_grad=True)
    loss_of = objective_terms(problem)
    opt = torch.optim.LBFGS(
        [w, c],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=grad_tol,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    state = {}

    def closure():
        opt.zero_grad()
        loss = loss_of(z @ w.T + c, y)
        total = loss + 0.5 * l2 * (w * w).sum()
        total.backward()
        state["loss"] = float(loss.detach())
        return total

    with torch.enable_grad():
        opt.step(closure)
        total = float(closure().detach())  # the gradient where it stopped, measured afresh
    grad = torch.cat([w.grad.flatten(), c.grad])
    grad_max = float(grad.abs().max())
    iterations = int(opt.state_dict()["state"][0]["n_iter"])
    w, c = w.detach(), c.detach()
    return Fit(w, c - w @ mean, iterations, grad_max <= grad_tol, grad_max, float(grad.norm()), total, state["loss"])


def default_l2(x: torch.Tensor) -> float:
    """s / N, s the mean squared norm of the N feature rows (the module docstring says why)."""
    return float(x.to(F64).pow(2).sum(1).mean()) / len(x)


def head_fitter(features: list[dict], batch_size: int, pad_id: int, l2: float | None, report: dict):
    """Job.converge for a linear probe: features, fit, the head's weights set; `report` gets what results.json keeps."""

    def fit(model: nn.Module) -> dict:
        t0 = time.perf_counter()
        x, y, tokens = pooled_features(model, features, batch_size, pad_id)
        t1 = time.perf_counter()
        head = model.head
        strength = l2 if l2 is not None else default_l2(x)
        f = fit_linear(x, y, head.num_labels, head.problem, strength)
        with torch.no_grad():
            head.classifier.weight.copy_(f.weight)
            head.classifier.bias.copy_(f.bias)
        report.update(
            fit="lbfgs",
            l2=strength,
            examples=len(x),
            iterations=f.iterations,
            converged=f.converged,
            grad_max=f.grad_max,
            grad_tol=GRAD_TOL,
            objective=f.objective,
            train_loss=f.loss,
            features_seconds=t1 - t0,
            fit_seconds=time.perf_counter() - t1,
        )
        return {"loss": f.loss, "tokens": tokens, "grad_norm": f.grad_norm}

    return fit


def not_converged(report: dict) -> str | None:
    """A warning when the fit stopped before its tolerance."""
    if report.get("fit") != "lbfgs" or report["converged"]:
        return None
    return (
        f"the linear probe's L-BFGS fit stopped after {report['iterations']} iterations with max |gradient| "
        f"{report['grad_max']:.2g}, above its tolerance {report['grad_tol']:g}; a larger --probe-l2 makes the "
        "problem better conditioned"
    )
