"""Random damage to a run directory against `info`, `eval`, `sample`, `export` and `--resume`.

One corruption per example, of any file of a stopped run (truncation, a byte flipped, a JSON value of the wrong
type, a key removed, the file deleted). Each command must then either work (the damage left a consistent run) or
exit 2 with one sentence: never a traceback, and never a success on weights that could not be checked — a change to
a file trainer_state.json vouches for, or to what it vouches with, must be refused by every command that reads it.

CI runs a fixed set of examples (derandomized, so a red CI is a real regression, not a new draw); `pytest -m slow
tests/cli/test_fuzz_run_dir.py` runs many more, freshly drawn.
"""

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis drives the fuzzing (dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.cli import tiny_runs  # noqa: E402
from tinygraft.cli.main import main  # noqa: E402

STEP = "checkpoints/step-00000002"
WEIGHTS = {f"{STEP}/model.safetensors", f"{STEP}/config.json", f"{STEP}/tokenizer.json"}  # what every command reads
TRAINING = {f"{STEP}/optimizer.safetensors", f"{STEP}/optimizer.json"}  # what --resume reads besides
ODD_VALUES = ["oops", -7, 1e308, None, [], {}, True, "\x00"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A pre-training run stopped at step 2 of 4 (one checkpoint), its corpus beside it."""
    root = tmp_path_factory.mktemp("fuzz")
    env = pytest.MonkeyPatch()
    env.setenv("XDG_CACHE_HOME", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_runs.stopped_run(root / "run", tiny_runs.write_corpus(root / "corpus.txt"), steps=4, stop_at=2)
    torch.set_num_threads(threads)
    env.undo()


def json_paths(value, prefix=()):
    """Every key path inside a JSON value (dict keys and list indices), depth first."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value[:3])
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from json_paths(v, (*prefix, k))


def corrupt(run: Path, data) -> tuple[str, str, bool]:
    """Damage one file of `run`; returns (the file, what was done, whether trainer_state's vouching was touched)."""
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    name = data.draw(st.sampled_from(files), label="file")
    path = run / name
    raw = path.read_bytes()
    kinds = ["truncate", "flip", "delete"]
    try:
        doc = json.loads(raw) if name.endswith(".json") else None
    except ValueError:
        doc = None
    paths = list(json_paths(doc)) if doc is not None else []
    if paths:
        kinds += ["retype", "drop"]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    vouching = False
    if kind == "delete":
        path.unlink()
        return name, kind, name.endswith("trainer_state.json")
    if kind == "truncate":
        new = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="length")]
    elif kind == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        new = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255), label="mask")]) + raw[at + 1 :]
    else:
        where = data.draw(st.sampled_from(paths), label="where")
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if kind == "drop" and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            old = parent[where[-1]]
            parent[where[-1]] = data.draw(st.sampled_from([v for v in ODD_VALUES if type(v) is not type(old)]))
        new = json.dumps(doc).encode()
        vouching = name.endswith("trainer_state.json") and where[0] in ("files", "step")
        kind = f"{kind} {'.'.join(map(str, where))}"
    path.write_bytes(new)
    return name, kind, vouching


def cli(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def check_one(stopped_run: Path, data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(stopped_run, run)
        name, kind, vouching = corrupt(run, data)
        read = name in WEIGHTS or vouching  # a command that loads the weights must refuse
        commands = {
            "info": (["info", run], False),
            "eval": (["eval", run], read),
            "sample": (["sample", run, "--tokens", 2], read),
            "export": (["export", run, "--to", Path(tmp) / "exported"], read),
            "resume": (["pretrain", "--out", run, "--resume"], read or name in TRAINING),
        }
        for command, (args, must_fail) in commands.items():
            code, err = cli(args)  # an exception escaping main is the traceback a user would see
            what = f"{command} after {kind} of {name}: exit {code}, stderr {err[-600:]!r}"
            if code == 0:
                assert not must_fail, "succeeded on unchecked files: " + what
                continue
            assert code == 2, what
            last = err.strip().splitlines()[-1] if err.strip() else ""
            assert last.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, what


def fuzz(stopped_run: Path, **how) -> None:
    @settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True, **how)
    @given(data=st.data())
    def one(data):
        check_one(stopped_run, data)

    one()


def test_a_damaged_run_works_or_is_one_sentence(stopped_run):
    fuzz(stopped_run, max_examples=60, derandomize=True)


@pytest.mark.slow
def test_a_damaged_run_works_or_is_one_sentence_many(stopped_run, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("hundreds of examples: run with `pytest -m slow tests/cli/test_fuzz_run_dir.py`")
    fuzz(stopped_run, max_examples=400)
