"""Which implementation of a kernel op runs: the Triton kernel or the PyTorch reference.

The rule: Triton when every tensor is on CUDA and Triton imports, the reference otherwise.
`TINYGRAFT_BACKEND=triton|reference` forces one. With `TRITON_INTERPRET=1` set before Triton is imported, the
Triton path runs on CPU tensors through Triton's interpreter, which is how the tests check kernels without a GPU.

Triton is imported here lazily, only when a Triton path is chosen, so `import tinygraft` works where Triton is
not installed (macOS, Windows) and a user may still set `TRITON_INTERPRET` after importing tinygraft.
"""

import importlib.util
import os

import torch

from tinygraft.errors import TinygraftError

BACKENDS = ("triton", "reference")


_TRITON_FOUND: bool | None = None


def triton_available() -> bool:
    global _TRITON_FOUND  # looked up once; a plain global rather than functools.cache, which Dynamo warns about
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    value = os.environ.get("TINYGRAFT_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise TinygraftError(f"TINYGRAFT_BACKEND={value!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return value


def backend_for(*tensors: torch.Tensor | None) -> str:
    """'triton' or 'reference' for an op over these tensors (None entries are ignored)."""
    present = [t for t in tensors if t is not None]
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if forced == "triton":
        if not triton_available():
            raise TinygraftError("TINYGRAFT_BACKEND=triton but Triton is not installed; pip install triton")
        if not on_cuda and not interpreting():
            raise TinygraftError(
                "TINYGRAFT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"


def describe() -> str:
    """One line for `tinygraft info`, benchmark tables and the training log."""
    forced = forced_backend()
    if forced:
        how = f"forced by TINYGRAFT_BACKEND={forced}"
    elif torch.cuda.is_available() and triton_available():
        how = "triton on CUDA tensors, reference elsewhere"
    else:
        how = "reference (no CUDA device)" if triton_available() else "reference (Triton not installed)"
    return how + (" [Triton interpreter]" if interpreting() else "")


def upcast_bf16_dots(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast bf16 tiles to fp32 before `tl.dot`.

    Triton 3.9's interpreter multiplies the raw bit patterns of bf16 operands in `tl.dot`
    (triton-lang/triton#11584); on a GPU the kernel keeps bf16 operands with fp32 accumulation.

    A second interpreter trap rides on the same flag: it casts fp32 -> bf16 by truncation where a GPU rounds to
    nearest even, doubling bf16 store error; kernels that store bf16 add the rounding bias to the bits first under
    this flag (see `_cast_out` in lora_triton.py).
    """
    return interpreting() and dtype == torch.bfloat16


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would give a matmul on this device now, or None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
