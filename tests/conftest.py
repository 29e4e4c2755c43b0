"""Test-wide set-up.

Triton reads TRITON_INTERPRET once, when it is first imported, so it is set here before any test module can
import Triton: without a GPU every Triton kernel runs under the interpreter on CPU tensors.

Every test starts from the seed TINYGRAFT_TEST_SEED (default 0) of torch's, Python's and numpy's RNGs. A test whose
verdict depends on that seed is fragile: run the suite under a few seeds to find one (`TINYGRAFT_TEST_SEED=1 pytest`).
"""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# `train.precision=auto` would mean bf16 on a CPU with AVX512-BF16 or AMX and fp32 on one without: pin it to fp32
# (subprocesses inherit this) so no verdict depends on which CPU runs the suite; bf16 tests ask for it.
os.environ["TINYGRAFT_CPU_BF16"] = "0"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repository (real labeled data); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it lives beside the repository, not in it)")
    return SHARED_DATA


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when present (compiled kernels), else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TEST_SEED = int(os.environ.get("TINYGRAFT_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(TEST_SEED)
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU OpenMP threads spin-wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
