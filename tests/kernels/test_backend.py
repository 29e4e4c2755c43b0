"""Dispatch rules of kernels/backend.py: which path runs, and the one-sentence errors when a forced one cannot."""

import pytest
import torch

from tinygraft.errors import TinygraftError
from tinygraft.kernels import backend


@pytest.fixture
def cpu_tensors():
    return torch.randn(3, 4), torch.randn(4)


def test_cpu_tensors_get_the_reference(monkeypatch, cpu_tensors):
    monkeypatch.delenv("TINYGRAFT_BACKEND", raising=False)
    assert backend.backend_for(*cpu_tensors) == "reference"
    assert backend.backend_for(cpu_tensors[0], None) == "reference"  # None entries are ignored
    assert backend.backend_for() == "reference"


def test_forced_reference_wins(monkeypatch, cpu_tensors):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "reference")
    assert backend.backend_for(*cpu_tensors) == "reference"
    assert "forced by TINYGRAFT_BACKEND=reference" in backend.describe()


@pytest.mark.parametrize("spelling", ["triton", " Triton ", "TRITON"])
def test_forced_triton_under_the_interpreter(monkeypatch, cpu_tensors, spelling):
    monkeypatch.setenv("TINYGRAFT_BACKEND", spelling)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.backend_for(*cpu_tensors) == "triton"
    assert backend.describe().endswith("[Triton interpreter]")


def test_empty_value_means_not_forced(monkeypatch, cpu_tensors):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "")
    assert backend.forced_backend() is None
    assert backend.backend_for(*cpu_tensors) == "reference"


@pytest.mark.parametrize("value", ["cuda", "triton3", "ref"])
def test_bad_backend_value_is_an_error(monkeypatch, cpu_tensors, value):
    monkeypatch.setenv("TINYGRAFT_BACKEND", value)
    with pytest.raises(TinygraftError, match="TINYGRAFT_BACKEND=.* is not a backend; use one of triton, reference"):
        backend.backend_for(*cpu_tensors)


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch, cpu_tensors):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TinygraftError, match="needs TRITON_INTERPRET=1"):
        backend.backend_for(*cpu_tensors)


def test_forced_triton_without_triton_installed_is_an_error(monkeypatch, cpu_tensors):
    monkeypatch.setenv("TINYGRAFT_BACKEND", "triton")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(TinygraftError, match="Triton is not installed"):
        backend.backend_for(*cpu_tensors)
    monkeypatch.delenv("TINYGRAFT_BACKEND")
    assert "Triton not installed" in backend.describe()


def test_upcast_flag_only_for_bf16_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.upcast_bf16_dots(torch.bfloat16)
    assert not backend.upcast_bf16_dots(torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.upcast_bf16_dots(torch.bfloat16)


def test_autocast_dtype(device):
    assert backend.autocast_dtype(device.type) is None
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert backend.autocast_dtype(device.type) == torch.bfloat16
