"""`import tinygraft` works where Triton is not installed (macOS, Windows, a bare CPU box), and the reference paths
serve there. Each check runs in a fresh interpreter whose import system refuses `triton`."""

import os
import subprocess
import sys
import textwrap

# Every meta-path finder is wrapped so that none of them sees `triton` or its submodules: to the interpreter Triton
# is simply absent (`import triton` raises ModuleNotFoundError, importlib.util.find_spec("triton") is None), as on a
# box where it was never installed.
BLOCK_TRITON = textwrap.dedent(
    """
    import sys

    class _HideTriton:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [_HideTriton(f) for f in sys.meta_path]
    """
)


def _run_without_triton(body: str, env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TINYGRAFT_BACKEND", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    code = BLOCK_TRITON + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_without_triton_and_reference_paths_run():
    out = _run_without_triton(
        """
        import importlib.util
        import sys

        import torch

        try:
            import triton  # noqa: F401
            raise SystemExit("the block let triton through")
        except ModuleNotFoundError:
            pass

        import tinygraft
        import tinygraft.kernels
        from tinygraft.kernels import backend, flash_attention
        from tinygraft.kernels.bias_gelu import bias_gelu, bias_gelu_reference

        assert "triton" not in sys.modules, "importing tinygraft imported triton"
        assert not any(m.startswith("triton.") for m in sys.modules)

        q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16)
        o = flash_attention(q, k, v, causal=True)
        assert o.shape == q.shape and torch.isfinite(o).all()
        o = flash_attention(q, k, v, dropout_p=0.1, seed=3)
        assert o.shape == q.shape

        x = torch.randn(7, 129, requires_grad=True)
        b = torch.randn(129, requires_grad=True)
        y = bias_gelu(x, b, "tanh")
        y.sum().backward()
        assert torch.equal(y, bias_gelu_reference(x, b, "tanh")) and b.grad.shape == (129,)

        assert "triton" not in sys.modules, "a reference path imported triton"
        print("describe:", backend.describe())
        """
    )
    assert "describe: reference (Triton not installed)" in out


def test_forcing_triton_without_it_is_one_sentence():
    out = _run_without_triton(
        """
        import torch
        from tinygraft.errors import TinygraftError
        from tinygraft.kernels.bias_gelu import bias_gelu

        try:
            bias_gelu(torch.randn(3, 4), torch.randn(4))
        except TinygraftError as e:
            print("error:", e)
        """,
        {"TINYGRAFT_BACKEND": "triton"},
    )
    assert "error: TINYGRAFT_BACKEND=triton but Triton is not installed; pip install triton" in out


def test_import_and_help_do_not_load_dynamo():
    """torch._dynamo costs a second and a half to import; nothing but torch.compile should pay for it, so
    `tinygraft --help` starts fast (kernels/rng.py applies torch.compiler.disable when dynamo traces a call)."""
    code = (
        "import sys; from tinygraft.cli.main import build_parser; build_parser(); print('torch._dynamo' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
