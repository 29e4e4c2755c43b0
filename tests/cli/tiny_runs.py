"""A pre-training run small enough to make in a second, for the tests that damage or interrupt one."""

import contextlib
import io
from pathlib import Path

from tinygraft.cli.main import main

# A one-layer GPT with 16-token windows: a step takes milliseconds on a CPU.
TINY = ["--preset", "gpt-tiny", "--set", "model.n_head=2", "--set", "model.n_layer=1", "--set", "model.n_embd=32",
        "--set", "data.vocab_size=300", "--set", "train.seq_len=16", "--set", "train.batch_size=2", "--set",
        "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1"]  # fmt: skip


def write_corpus(path: Path) -> Path:
    path.write_text("".join(f"line {i}: a small corpus for a tiny model, read twice.\n" for i in range(300)))
    return path


def stopped_run(out: Path, corpus: Path, steps: int, stop_at: int) -> Path:
    """`pretrain` of TINY on `corpus`, stopped at `stop_at` of `steps`; its output is swallowed."""
    args = ["pretrain", "--out", out, "--data", corpus, *TINY, "--steps", steps, "--stop-at", stop_at]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main([str(a) for a in args]) == 0
    return out


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one `tinygraft` command, the arguments stringified."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
