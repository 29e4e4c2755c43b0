"""train.precision: what `auto` means by the detected CPU capability (mocked both ways), and the explicit choices."""

import pytest
import torch

from tinygraft.core import precision
from tinygraft.errors import TinygraftError

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""


def test_cpu_flags_reads_the_first_processors_flags():
    flags = precision.cpu_flags(CPUINFO.format(extra="avx512_bf16 amx_tile amx_bf16"))
    assert {"avx512f", "avx512_bf16", "amx_bf16"} <= flags and "spectre_v1" not in flags
    assert precision.cpu_flags("no flags here") == set()


@pytest.mark.parametrize(
    "extra, native",
    [("avx512_bf16 amx_tile amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512vl", None), ("", None)],
)
def test_auto_follows_the_detected_capability(monkeypatch, extra, native):
    monkeypatch.delenv("TINYGRAFT_CPU_BF16", raising=False)
    parse = precision.cpu_flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: parse(CPUINFO.format(extra=extra)))
    assert precision.cpu_bf16() == native
    auto = precision.resolve("auto", torch.device("cpu"))
    if native:
        assert auto.dtype is torch.bfloat16 and auto.name == "bf16" and native in auto.line
    else:
        assert auto.dtype is None and auto.name == "fp32" and "no native bf16" in auto.line
    assert precision.resolve("fp32", torch.device("cpu")).dtype is None
    bf16 = precision.resolve("bf16", torch.device("cpu"))
    assert bf16.dtype is torch.bfloat16 and (native in bf16.line if native else "emulated" in bf16.line)


def test_the_override_and_cuda(monkeypatch):
    monkeypatch.setenv("TINYGRAFT_CPU_BF16", "1")
    assert precision.resolve("auto", torch.device("cpu")).dtype is torch.bfloat16
    monkeypatch.setenv("TINYGRAFT_CPU_BF16", "0")
    assert precision.resolve("auto", torch.device("cpu")).dtype is None
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert precision.resolve("auto", cuda).dtype is torch.bfloat16
    assert precision.resolve("fp32", cuda).dtype is None
    with pytest.raises(TinygraftError, match="'fp16' is not a precision; use one of auto, fp32, bf16"):
        precision.resolve("fp16", torch.device("cpu"))


def test_autocast_factory_is_a_no_op_in_fp32_and_bf16_otherwise():
    cpu = torch.device("cpu")
    a, b = torch.randn(3, 5), torch.randn(5, 2)
    with precision.autocast(cpu, precision.Precision(None, ""))():
        assert (a @ b).dtype is torch.float32
    with precision.autocast(cpu, precision.Precision(torch.bfloat16, ""))():
        assert (a @ b).dtype is torch.bfloat16
