"""core/cka.py against the n x n formulas the papers write: CKA's invariances, the two estimators on independent
inputs, the one-pass sums over awkward batches, and SVCCA against a CCA computed with numpy and scipy."""

import numpy as np
import pytest
import scipy.linalg
import torch

from tinygraft.core.cka import LayerSimilarity
from tinygraft.errors import TinygraftError

F64 = torch.float64
EPS = torch.finfo(F64).eps
pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices on a shared CPU (tests/conftest.py)


# ------------------------------------------------------------------------------------------ the references
def gram_hsic(K: torch.Tensor, L: torch.Tensor, debiased: bool) -> torch.Tensor:
    n = K.shape[0]
    if not debiased:  # tr(KHLH) / (n-1)²
        H = torch.eye(n, dtype=F64) - 1.0 / n
        return torch.trace(K @ H @ L @ H) / (n - 1) ** 2
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)  # Song et al. 2012's U-statistic
    one = torch.ones(n, dtype=F64)
    return (
        torch.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def gram_cka(X: torch.Tensor, Y: torch.Tensor, debiased: bool) -> float:
    """On the column-centred features, as Kornblith et al.'s code computes it."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda a, b: gram_hsic(a, b, debiased)  # noqa: E731
    return float(hsic(K, L) / (hsic(K, K) * hsic(L, L)).sqrt())


def one_pass(xs: list[torch.Tensor], ys: list[torch.Tensor], sizes: list[int] | None = None) -> LayerSimilarity:
    acc = LayerSimilarity()
    sizes = sizes or [xs[0].shape[0]]
    for x_parts, y_parts in zip(zip(*(x.split(sizes) for x in xs)), zip(*(y.split(sizes) for y in ys))):
        acc.add(list(x_parts), list(y_parts))
    return acc


def cka(X, Y, debiased=True) -> float:
    return float(one_pass([X], [Y]).cka(debiased)[0, 0])


def related(g: torch.Generator, n=120, p=10, q=8):
    """Two representations that share a part (Y reads X through a random map, plus its own noise)."""
    X = torch.randn(n, p, generator=g, dtype=F64)
    Y = torch.tanh(X @ torch.randn(p, q, generator=g, dtype=F64)) + 0.5 * torch.randn(n, q, generator=g, dtype=F64)
    return X, Y


def orthogonal(p: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))[0]


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("debiased", [True, False])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    X = torch.randn(50, 12, generator=torch.Generator().manual_seed(0), dtype=F64) * 3 + 1
    assert cka(X, X, debiased) == pytest.approx(1.0, abs=100 * EPS)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariant_to_rotation_scaling_and_translation_not_to_any_invertible_map(debiased):
    g = torch.Generator().manual_seed(1)
    X, Y = related(g)
    base = cka(X, Y, debiased)
    assert 0.2 < base < 0.95  # a value that could move
    rotated = X @ orthogonal(X.shape[1], g) * 3.7
    shifted = X + 40.0 * torch.randn(X.shape[1], generator=g, dtype=F64)
    # float64 rounding, amplified by the scale and by the shift's cancellation
    assert cka(rotated, Y, debiased) == pytest.approx(base, abs=1e4 * EPS)
    assert cka(shifted, Y, debiased) == pytest.approx(base, abs=1e6 * EPS)
    stretched = X @ torch.diag(torch.logspace(-2, 2, X.shape[1], dtype=F64)) @ orthogonal(X.shape[1], g)
    assert abs(cka(stretched, Y, debiased) - base) > 0.1


def test_independent_inputs_debiased_near_zero_biased_well_above():
    g = torch.Generator().manual_seed(2)
    values = {True: [], False: []}
    for _ in range(20):
        acc = one_pass([torch.randn(64, 16, generator=g, dtype=F64)], [torch.randn(64, 16, generator=g, dtype=F64)])
        for debiased in values:
            values[debiased].append(float(acc.cka(debiased)[0, 0]))
    assert abs(np.mean(values[True])) < 0.02  # its spread over draws is ~0.02, so the mean of 20 is within ~0.005
    assert np.mean(values[False]) > 0.1  # ~0.2: the chance correlations of 64 rows in 16 dimensions


@pytest.mark.parametrize("debiased", [True, False])
def test_one_pass_over_awkward_batches_equals_the_full_batch_gram_computation(debiased):
    """Batches of 1, 7, 13 and a remainder, features with a large mean (the shift's reason), widths that differ,
    two layers of A against three of B: every entry equals the n x n formula on all rows at once."""
    g = torch.Generator().manual_seed(3)
    n, sizes = 51, [1, 7, 13, 13, 13, 4]
    base = torch.randn(n, 9, generator=g, dtype=F64)
    xs = [base * torch.rand(9, generator=g, dtype=F64) + 50, base[:, :5] @ torch.randn(5, 5, generator=g, dtype=F64)]
    ys = [torch.tanh(base @ torch.randn(9, q, generator=g, dtype=F64)) + 0.5 * torch.randn(n, q, generator=g, dtype=F64)
          - 7 for q in (12, 3, 9)]  # fmt: skip
    acc = one_pass(xs, ys, sizes)
    assert acc.n == n
    got = acc.cka(debiased)
    assert got.shape == (2, 3) and got.min() > 0.1  # related layers: values far from 0
    want = torch.tensor([[gram_cka(x, y, debiased) for y in ys] for x in xs], dtype=F64)
    tol = 100 * n * EPS  # sums over n rows in float64 round to ~n eps (seen: ~1e-14); room for the subtractions
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(one_pass(xs, ys).cka(debiased), got, rtol=0, atol=tol)


def svcca_reference(X: np.ndarray, Y: np.ndarray, keep: float) -> float:
    """Raghu et al.: SVD of the centred data, the top directions explaining `keep` of the variance, then the canonical
    correlations as the singular values of Qxᵀ Qy (orthonormal bases of the reduced data, scipy.linalg.orth)."""

    def reduced(Z):
        U, s, _ = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep)) + 1
        return U[:, :k] * s[:k]

    Qx, Qy = scipy.linalg.orth(reduced(X)), scipy.linalg.orth(reduced(Y))
    return float(np.linalg.svd(Qx.T @ Qy, compute_uv=False).mean())


@pytest.mark.parametrize("keep", [0.99, 0.9, 1.0])
def test_svcca_equals_a_direct_cca_of_the_svd_reduced_data(keep):
    """Low-rank features plus a little noise, so 99% keeps fewer directions than the width; with keep=1.0 two
    features are copies of others (rank below the width), so the null directions must be dropped to agree."""
    g = torch.Generator().manual_seed(4)
    n = 300
    Z = torch.randn(n, 4, generator=g, dtype=F64)
    X = Z @ torch.randn(4, 12, generator=g, dtype=F64) + 0.05 * torch.randn(n, 12, generator=g, dtype=F64)
    X = torch.cat([X, X[:, :2] * 2.0], 1)  # two exact copies: rank 12 of width 14
    Y = torch.tanh(Z @ torch.randn(4, 10, generator=g, dtype=F64)) + 0.1 * torch.randn(n, 10, generator=g, dtype=F64)
    got = float(one_pass([X], [Y], [7, 100, 193]).svcca(keep)[0, 0])
    want = svcca_reference(X.numpy(), Y.numpy(), keep)
    assert 0.3 < want < 1.0
    # eigh of the covariance against an SVD of the data: each rounds at ~eps, the whitening amplifies it by the
    # spread of the kept variances (seen: 1e-14 at keep=1.0, where the smallest kept direction is noise)
    assert got == pytest.approx(want, abs=1e6 * EPS)


def test_few_rows_and_constant_layers():
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)
    acc = one_pass([X], [Y], [1, 2])
    with pytest.raises(TinygraftError, match=r"^the debiased CKA needs at least 4 rows \(inputs or tokens\), got 3$"):
        acc.cka(debiased=True)
    assert float(acc.cka(debiased=False)[0, 0]) == pytest.approx(gram_cka(X, Y, debiased=False), abs=1e-12)
    constant = one_pass([torch.ones(10, 3, dtype=F64)], [torch.randn(10, 2, generator=g, dtype=F64)])
    assert constant.cka(True).isnan().all() and constant.cka(False).isnan().all() and constant.svcca().isnan().all()
    with pytest.raises(
        TinygraftError, match=r"^--svcca-keep is the share of variance SVCCA keeps, in \(0, 1\]; got 0.0$"
    ):
        constant.svcca(keep=0.0)
