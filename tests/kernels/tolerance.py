"""The tolerance rule of every kernel test: a kernel may be as wrong as PyTorch's own op, twice over, and no more.

    error(kernel vs float64) <= 2 * max(error(PyTorch in the kernel's dtype vs float64), floor) + atol
    floor = eps(dtype) * sqrt(K) * scale      K: the reduction length behind the output, scale: its magnitude

PyTorch's own error is one machine's luck: where its BLAS happens to sum in the float64 order (a CPU with other
vector units, a reduction of one or two terms) it can be near zero, and twice zero would ask a kernel that sums in
its own order to be bit-exact. The floor is what rounding alone may cost any correct summation order: a sum of K
terms in `dtype` carries about eps * sqrt(K) times their magnitude (Higham, "Accuracy and Stability of Numerical
Algorithms", section 4.2: the random-walk estimate of recursive summation). An Intel Xeon with AVX-512 showed the
need: LoRA's dA of one token (K = 17) was 9.5e-7 off against torch's 2.4e-7 there, 8 ulps at its scale of ~1.
"""

import math

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def rounding_floor(dtype: torch.dtype, k: int, scale: float) -> float:
    return torch.finfo(dtype).eps * math.sqrt(max(k, 1)) * scale


def assert_rule(
    name: str,
    ours: torch.Tensor,
    theirs: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    k: int,
    scale: float | None = None,
    atol: float = 0.0,
) -> None:
    """`ours` (the kernel) and `theirs` (PyTorch in `dtype`) against the float64 `ref`, by the rule above."""
    assert torch.isfinite(ours).all(), f"{name}: kernel output holds NaN or inf"
    scale = ref.abs().max().item() if scale is None and ref.numel() else (scale or 0.0)
    floor = rounding_floor(dtype, k, scale)
    err, torch_err = max_err(ours, ref), max_err(theirs, ref)
    budget = 2 * max(torch_err, floor) + atol
    assert err <= budget, (
        f"{name}: kernel error {err:.3g} > 2 x max(torch's {torch_err:.3g}, rounding floor {floor:.3g}) + {atol:.3g}"
    )
