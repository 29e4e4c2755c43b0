"""How alike two sets of features are, layer by layer: linear CKA (debiased and biased) and SVCCA, in one pass.

X (n x p) and Y (n x q) hold the same n inputs' features (a row per text or per token) from two layers. With the
linear kernels K = X Xᵀ and L = Y Yᵀ (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited"):

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

    biased    HSIC₀ = tr(K H L H) / (n-1)²,  H = I - 11ᵀ/n,  = ||X̄ᵀȲ||²_F / (n-1)²  (X̄, Ȳ column-centred)
    debiased  HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))
              K̃, L̃ = K, L with zeroed diagonals (Song et al. 2012, the unbiased U-statistic)

The biased estimator reads ~0.2 on independent random features of 64 rows and width 16 (the finite sample's chance
correlations); the debiased one reads ~0 there. Both are written in feature space, so no n x n matrix is formed: with
a_i = ||x_i||², b_i = ||y_i||², s = Σ x_i, t = Σ y_i,

    tr(K̃L̃)   = ||XᵀY||²_F - Σ a_i b_i
    1ᵀK̃1    = ||s||² - Σ a_i
    1ᵀK̃L̃1   = (X s - a)ᵀ(Y t - b) = sᵀ(XᵀY)t - sᵀ(Σ b_i x_i) - (Σ a_i y_i)ᵀt + Σ a_i b_i
    X̄ᵀȲ     = XᵀY - s tᵀ / n

so one pass over the batches accumulates XᵀY (p x q), XᵀX, YᵀY, s, t, Σa, Σb, Σa², Σb², Σ a_i b_i, Σ b_i x_i,
Σ a_i y_i (and Σ a_i x_i, Σ b_i y_i for HSIC(K, K) and HSIC(L, L)) in float64, and the estimators come out exact:
the same numbers as the n x n computation on all rows at once, whatever the batching (memory O(p² + q² + pq)).

Both estimators are invariant to translating X or Y (the debiased one is a U-statistic of the covariance, checked
in tests/analysis/test_cka.py), so the sums are taken over x_i - c with c the first batch's mean: features with a
large mean (a transformer's residual stream has a few huge dimensions) would otherwise cancel catastrophically
in ||XᵀY||² - Σ a_i b_i. The result equals the estimator on the column-centred data, the form the literature uses.

SVCCA (Raghu et al. 2017): keep each side's top principal directions explaining `keep` (99%) of its variance, then
the mean canonical correlation between the two reduced representations, all from the same centred covariances.

This is core/ rather than analysis/ because a fine-tuning run watches its features' drift with it while it trains
(train/continual.py), and analysis/ sits above train/; `tinygraft cka` (analysis/similarity.py) is its command.
"""

from dataclasses import dataclass

import torch

from tinygraft.errors import TinygraftError

F64 = torch.float64


@dataclass
class Moments:
    """Running sums of one representation's rows z_i = x_i - shift (a_i = ||z_i||²)."""

    shift: torch.Tensor  # (p,) the first batch's mean
    n: int
    total: torch.Tensor  # Σ z_i  (p,)
    gram: torch.Tensor  # Σ z_i z_iᵀ = ZᵀZ  (p, p)
    sq: float  # Σ a_i
    sq_sq: float  # Σ a_i²
    sq_weighted: torch.Tensor  # Σ a_i z_i  (p,)

    @classmethod
    def starting_at(cls, shift: torch.Tensor) -> "Moments":
        p = shift.shape[0]
        zeros = torch.zeros(p, dtype=F64)
        return cls(shift, 0, zeros, torch.zeros(p, p, dtype=F64), 0.0, 0.0, zeros.clone())

    def add(self, z: torch.Tensor, a: torch.Tensor) -> None:
        self.n += z.shape[0]
        self.total += z.sum(0)
        self.gram += z.T @ z
        self.sq += float(a.sum())
        self.sq_sq += float(a @ a)
        self.sq_weighted += a @ z

    def scatter(self) -> torch.Tensor:
        """Z̄ᵀZ̄ of the column-centred rows: (n - 1) x the covariance."""
        return self.gram - torch.outer(self.total, self.total) / self.n


@dataclass
class Cross:
    """Running sums over the same rows of two representations (z_i of X, w_i of Y; a_i, b_i their squared norms)."""

    zw: torch.Tensor  # ZᵀW  (p, q)
    ab: float  # Σ a_i b_i
    b_z: torch.Tensor  # Σ b_i z_i  (p,)
    a_w: torch.Tensor  # Σ a_i w_i  (q,)

    @classmethod
    def zeros(cls, p: int, q: int) -> "Cross":
        return cls(torch.zeros(p, q, dtype=F64), 0.0, torch.zeros(p, dtype=F64), torch.zeros(q, dtype=F64))

    @classmethod
    def of_self(cls, m: Moments) -> "Cross":
        """X against itself: every cross sum is one of X's own."""
        return cls(m.gram, m.sq_sq, m.sq_weighted, m.sq_weighted)

    def add(self, z: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
        self.zw += z.T @ w
        self.ab += float(a @ b)
        self.b_z += b @ z
        self.a_w += a @ w


def hsic_debiased(x: Moments, y: Moments, c: Cross) -> float:
    n = x.n
    if n < 4:  # the estimator divides by n - 3 and n - 2
        raise TinygraftError(f"the debiased CKA needs at least 4 rows (inputs or tokens), got {n}")
    s, t = x.total, y.total
    tr = float((c.zw * c.zw).sum()) - c.ab
    k1 = float(s @ s) - x.sq
    l1 = float(t @ t) - y.sq
    kl1 = float(s @ c.zw @ t - s @ c.b_z - c.a_w @ t) + c.ab
    return (tr + k1 * l1 / ((n - 1) * (n - 2)) - 2 * kl1 / (n - 2)) / (n * (n - 3))


def hsic_biased(x: Moments, y: Moments, c: Cross) -> float:
    """||X̄ᵀȲ||²_F, without the 1 / (n-1)² that cancels in CKA."""
    centred = c.zw - torch.outer(x.total, y.total) / x.n
    return float((centred * centred).sum())


def ratio(num: float, den: float) -> float:
    """num / sqrt(den); NaN where a side has no variance (a constant layer), for which CKA is undefined."""
    return num / den**0.5 if den > 0 else float("nan")


def cka_of(x: Moments, y: Moments, c: Cross, debiased: bool = True) -> float:
    hsic = hsic_debiased if debiased else hsic_biased
    return ratio(hsic(x, y, c), hsic(x, x, Cross.of_self(x)) * hsic(y, y, Cross.of_self(y)))


# ----------------------------------------------------------------------------------------------------- SVCCA
def check_keep(keep: float) -> None:
    if not 0.0 < keep <= 1.0:
        raise TinygraftError(f"--svcca-keep is the share of variance SVCCA keeps, in (0, 1]; got {keep}")


def top_directions(scatter: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(variances (k,), directions (p, k)): the fewest principal directions explaining `keep` of the variance."""
    var, vec = torch.linalg.eigh(scatter)
    var, vec = var.flip(0).clamp(min=0), vec.flip(1)  # largest first
    k = int((torch.cumsum(var, 0) < keep * var.sum()).sum()) + 1
    # Whitening divides by sqrt(variance), so a null direction (rank below the width: fewer rows than features, or a
    # dead feature) would turn eigh's rounding noise (~eps * the largest variance) into a unit-variance direction
    # and a spurious canonical correlation; such directions are dropped, as scipy.linalg.orth drops them.
    k = min(k, int((var > var[0] * scatter.shape[0] * torch.finfo(F64).eps).sum()))
    return var[:k], vec[:, :k]


def svcca_of(x: Moments, y: Moments, c: Cross, keep: float = 0.99) -> float:
    """Mean canonical correlation of the SVD-reduced X and Y. The reduced X̄ U_x has covariance diag(var_x), so the
    canonical correlations are the singular values of diag(var_x)^-½ U_xᵀ X̄ᵀȲ U_y diag(var_y)^-½."""
    vx, ux = top_directions(x.scatter(), keep)
    vy, uy = top_directions(y.scatter(), keep)
    if not len(vx) or not len(vy):
        return float("nan")  # a constant layer: nothing to correlate
    cross = c.zw - torch.outer(x.total, y.total) / x.n
    whitened = (ux.T @ cross @ uy) / vx.sqrt()[:, None] / vy.sqrt()[None, :]
    return float(torch.linalg.svdvals(whitened).clamp(max=1.0).mean())


# ----------------------------------------------------------------------------------------------- accumulator
class LayerSimilarity:
    """The running sums for every layer pair of two models, A (layers 0 .. La) and B (0 .. Lb), over the same rows.

    add(xs, ys): one batch, xs[i] (rows, p_i) = A's layer i, ys[j] (rows, q_j) = B's layer j.
    cka(debiased) / svcca(keep): (La + 1, Lb + 1) tensors, entry [i, j] comparing A's layer i with B's layer j.
    """

    def __init__(self):
        self.a: list[Moments] = []
        self.b: list[Moments] = []
        self.cross: list[list[Cross]] = []

    @property
    def n(self) -> int:
        return self.a[0].n if self.a else 0

    def add(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        rows = {t.shape[0] for t in [*xs, *ys]}
        if len(rows) != 1:
            raise ValueError(f"every layer of a batch must hold the same rows, got row counts {sorted(rows)}")
        if not self.a:
            self.a = [Moments.starting_at(x.to(F64).mean(0)) for x in xs]
            self.b = [Moments.starting_at(y.to(F64).mean(0)) for y in ys]
            self.cross = [[Cross.zeros(x.shape[1], y.shape[1]) for y in ys] for x in xs]
        za, zb = self._shifted(xs, self.a), self._shifted(ys, self.b)
        for (z, a), m in zip(za, self.a):
            m.add(z, a)
        for (w, b), m in zip(zb, self.b):
            m.add(w, b)
        for (z, a), row in zip(za, self.cross):
            for (w, b), c in zip(zb, row):
                c.add(z, a, w, b)

    @staticmethod
    def _shifted(xs: list[torch.Tensor], moments: list[Moments]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for x, m in zip(xs, moments):
            z = x.to(F64) - m.shift
            out.append((z, (z * z).sum(1)))
        return out

    def _matrix(self, fn) -> torch.Tensor:
        rows = [[fn(x, y, self.cross[i][j]) for j, y in enumerate(self.b)] for i, x in enumerate(self.a)]
        return torch.tensor(rows, dtype=F64)

    def cka(self, debiased: bool = True) -> torch.Tensor:
        return self._matrix(lambda x, y, c: cka_of(x, y, c, debiased))

    def svcca(self, keep: float = 0.99) -> torch.Tensor:
        check_keep(keep)
        return self._matrix(lambda x, y, c: svcca_of(x, y, c, keep))
