"""Checkpoint directories: written whole, then renamed, so a crash at any instant leaves a complete one.

Layout, under `RUN/checkpoints/`:

    step-00000300/            one directory per saved step, never modified after it is renamed into place
        model.safetensors     the tensors the method keeps (the whole model for `full`, an adapter for LoRA)
        optimizer.safetensors every tensor of the optimizer's state, named `state.<param index>.<key>`
        optimizer.json        the rest of optimizer.state_dict(): param_groups and non-tensor state values
        trainer_state.json    step, tokens seen, data position, RNG states, schedule, best metric, the sha256 of
                              every other file, and `state_sha256` of its own other fields (written last: its
                              presence marks the directory complete)
        config.json           the full resolved config
        tokenizer.json        the tokenizer
        ...                   any extra files a method adds (adapter_config.json, ...)
    latest                    one line naming the newest complete step directory, replaced atomically
    best                      likewise, for the best value of the tracked metric

A save writes everything into `checkpoints/.tmp-step-*`, fsyncs each file and the directory, renames it to
`step-*`, fsyncs `checkpoints/`, then swaps the pointer (temp file, fsync, os.replace). Only safetensors and JSON
are read back: no pickle anywhere.

An FSDP run's step directory (`save(shard=True)`, trainer_state.json's "sharded") keeps its tensors as every process's
shards under sharded/ (core/sharded.py) in place of model.safetensors and optimizer.safetensors: every process
writes its shards into the temporary directory, rank 0 the rest and the rename, so it too is complete or absent.
`load` assembles the whole tensors, so every reader of a checkpoint reads both kinds alike.
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tinygraft.core import dist, sharded
from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED = (MODEL_FILE, TRAINER_STATE, CONFIG_FILE)
STATE_DIGEST = "state_sha256"  # trainer_state.json's own fields (all but the file hashes and itself), checked too
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- atomic file writes
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` so a reader sees the old file or the new one, never a mix."""
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------- optimizer <-> safetensors
def optimizer_to_files(state_dict: dict, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors; none when not `with_tensors`: a sharded save
    writes them itself) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                if with_tensors:
                    tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, per_param in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(per_param)
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_state_bytes(state_dict: dict) -> int:
    return sum(
        v.numel() * v.element_size()
        for per_param in state_dict["state"].values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )


# ------------------------------------------------------------------------------------------------------- saving
def save(
    root: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    trainer_state: dict,
    config: dict,
    optimizer: dict | None = None,
    tokenizer_json: str | None = None,
    extra_files: dict[str, bytes | str] | None = None,
    keep: int | None = None,
    best: bool = False,
    shard: bool = False,
) -> Path:
    """Write checkpoint `step` under `root` (a run's `checkpoints/`), point `latest` (and `best`) at it, prune.

    `optimizer` is an `optimizer.state_dict()`. `keep` keeps that many newest step directories (plus the one
    `best` names); None keeps all. Returns the new step directory. `shard`: an FSDP run's save, called by every
    process with its own (DTensor) `model` and `optimizer`; rank 0 writes all but the shards.
    """
    root = Path(root)
    name = step_dir_name(step)
    files: dict[str, bytes] = {}
    if shard:
        tmp = root / f".tmp-{name}-sharded"  # one name every process agrees on
        if dist.is_main():
            _fresh(tmp)
        dist.barrier()
        sharded.write(tmp, sharded.flatten(model, optimizer))
        dist.barrier()
        if not dist.is_main():
            return root / name
        written = {f: hashlib.sha256((tmp / f).read_bytes()).hexdigest() for f in sharded.files(tmp)}
    else:
        files[MODEL_FILE] = st_save({k: v.detach().contiguous().cpu() for k, v in model.items()})
        tmp, written = _fresh(root / f".tmp-{name}-{os.getpid()}"), {}
    if optimizer is not None:
        tensors, meta = optimizer_to_files(optimizer, with_tensors=not shard)
        if not shard:
            files[OPTIMIZER_TENSORS] = st_save(tensors)
        files[OPTIMIZER_JSON] = json.dumps(meta, indent=1).encode()
    files[CONFIG_FILE] = json.dumps(config, indent=2).encode()
    if tokenizer_json is not None:
        files[TOKENIZER_FILE] = tokenizer_json.encode("utf-8")
    for fname, data in (extra_files or {}).items():
        files[fname] = data.encode("utf-8") if isinstance(data, str) else data
    digests = {**written, **{f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
    state = dict(trainer_state, step=step, files=digests, **({"sharded": True} if shard else {}))
    state[STATE_DIGEST] = state_digest(state)
    files[TRAINER_STATE] = json.dumps(state, indent=1).encode()
    try:
        for fname, data in files.items():  # trainer_state.json last: it names the others
            _write_synced(tmp / fname, data)
        _fsync_dir(tmp)
    except BaseException:  # a full disk, a second Ctrl-C: leave no half-written directory for the next save
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():  # re-saving a step (a resumed run stopped at the same step): replace it whole
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write(root / "latest", name + "\n")
    if best:
        atomic_write(root / "best", name + "\n")
    if keep is not None:
        prune(root, keep)
    return final


def _fresh(tmp: Path) -> Path:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def list_steps(root: str | Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def _pointer(root: Path, which: str) -> str | None:
    """The step directory name `root/which` holds (None: no such file); anything but a step name is refused."""
    path = root / which
    if not path.is_file():
        return None
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not STEP_DIR.match(name):
        raise TinygraftError(f"'{path}' should name a step directory beside it (one line like step-00000300)")
    return name


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest step directories, never the ones `latest` or `best` name."""
    root = Path(root)
    protected = {_pointer(root, "latest"), _pointer(root, "best")}
    steps = list_steps(root)
    for step in steps[: max(0, len(steps) - keep)]:
        if step_dir_name(step) not in protected:
            shutil.rmtree(root / step_dir_name(step))


# ------------------------------------------------------------------------------------------------------ loading
def resolve(path: str | Path, which: str = "latest") -> Path:
    """The step directory meant by `path`: a step directory, a `checkpoints/` directory, or a run directory."""
    path = Path(path)
    if not path.exists():
        raise TinygraftError(f"checkpoint path {str(path)!r} does not exist")
    if (path / TRAINER_STATE).is_file() or STEP_DIR.match(path.name):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    name = _pointer(root, which)
    if name is None:
        raise TinygraftError(f"{str(path)!r} holds no checkpoint (no '{which}' file in {str(root)!r})")
    target = root / name
    if not target.is_dir():
        raise TinygraftError(f"'{which}' in {str(root)!r} names {name!r}, which does not exist")
    return target


NUMBER = (int, float)
# The fields the training loop and its jobs write into trainer_state.json, by type: checked when present (a
# checkpoint older than a field lacks it), so a hand-edited or damaged one is refused in one sentence.
STATE_FIELDS = {
    "tokens_seen": int, "train_seconds": NUMBER, "eval_seconds": NUMBER, "data": dict, "rng": dict,
    "schedule": dict, "best": dict, "token_cache": (str, type(None)), "data_sha256": dict, STATE_DIGEST: str,
}  # fmt: skip


def _check_fields(where: str, state: dict) -> None:
    for key, kind in STATE_FIELDS.items():
        value = state.get(key)
        if key in state and (not isinstance(value, kind) or isinstance(value, bool)):
            raise TinygraftError(f"{where} holds an invalid {key!r} ({str(value)[:40]!r})")
    best = state.get("best", {})
    if not (isinstance(best.get("value"), (*NUMBER, type(None))) and isinstance(best.get("step"), (int, type(None)))):
        raise TinygraftError(f"{where} holds an invalid 'best' ({str(best)[:60]!r})")
    if not all(isinstance(v, str) for v in state.get("data_sha256", {}).values()):
        raise TinygraftError(f"{where} holds an invalid 'data_sha256'")


def state_digest(state: dict) -> str:
    """sha256 of the state's own fields, as they read back from JSON (tuples become lists, keys strings)."""
    own = json.loads(json.dumps({k: v for k, v in state.items() if k not in ("files", STATE_DIGEST)}))
    return hashlib.sha256(json.dumps(own, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_state(step_dir: Path, state: dict) -> None:
    """trainer_state.json must name the step and the sha256 of every file it vouches for: a checkpoint whose weights
    cannot be checked is refused, not trusted."""
    where = f"checkpoint file '{step_dir / TRAINER_STATE}'"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TinygraftError(f"{where} names no step (got {step!r})")
    files = state.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise TinygraftError(f"{where} records no sha256 of the checkpoint's files, so they cannot be checked")
    bad = [k for k in files if not _own_file(k)]
    if bad:
        raise TinygraftError(f"{where} names {bad[0]!r}, which is not a file of the checkpoint")
    _check_fields(where, state)
    if STATE_DIGEST in state and state[STATE_DIGEST] != state_digest(state):  # absent in checkpoints before it
        raise TinygraftError(f"{where} is corrupt (its fields differ from the sha256 saved with them)")
    present = sorted(p.name for p in step_dir.iterdir() if p.is_file() and p.name != TRAINER_STATE)
    present += sharded.files(step_dir)
    weights = () if state.get("sharded") else (MODEL_FILE,)
    unvouched = [f for f in (*weights, CONFIG_FILE, *present) if f not in files]
    if state.get("sharded") and not sharded.files(step_dir):
        raise TinygraftError(f"checkpoint {str(step_dir)!r} is incomplete: its shards ({sharded.SHARDS}/) are missing")
    if unvouched:
        raise TinygraftError(f"{where} records no sha256 of {unvouched[0]}, so it cannot be checked")


def _own_file(name: str) -> bool:
    """A name trainer_state.json may vouch for: a file of the step directory, or a shard in its sharded/."""
    parts = Path(name).parts
    if len(parts) == 2 and parts[0] == sharded.SHARDS:
        parts = parts[1:]
    return len(parts) == 1 and parts[0] not in (".", "..") and Path(name).as_posix() == name


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    trainer_state: dict
    config: dict
    optimizer: dict | None  # an optimizer.state_dict(), or None when the checkpoint holds none

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


def _read_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise TinygraftError(f"checkpoint file {str(path)!r} is corrupt or truncated ({e})") from None


def load(path: str | Path, which: str = "latest", with_optimizer: bool = True) -> Checkpoint:
    """Read and verify a checkpoint (every file present and matching its recorded sha256); a sharded one's tensors
    are assembled whole."""
    step_dir = resolve(path, which)
    if not (step_dir / TRAINER_STATE).is_file():
        raise TinygraftError(f"checkpoint {str(step_dir)!r} is incomplete: {TRAINER_STATE} is missing")
    state = read_json(step_dir / TRAINER_STATE, "checkpoint file")
    is_sharded = state.get("sharded") is True
    for fname in REQUIRED:
        if not (step_dir / fname).is_file() and not (is_sharded and fname == MODEL_FILE):
            raise TinygraftError(f"checkpoint {str(step_dir)!r} is incomplete: {fname} is missing")
    _check_state(step_dir, state)
    blobs = {}
    for fname, digest in state["files"].items():
        fpath = step_dir / fname
        if not fpath.is_file():
            raise TinygraftError(f"checkpoint {str(step_dir)!r} is incomplete: {fname} is missing")
        if fname.endswith(".safetensors") and (fname != OPTIMIZER_TENSORS or with_optimizer):
            blobs[fname] = fpath.read_bytes()
            data = blobs[fname]
        elif fname.endswith(".safetensors"):
            continue
        else:
            data = fpath.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise TinygraftError(f"checkpoint file {str(fpath)!r} is corrupt (its sha256 differs from the saved one)")
    if is_sharded:
        model, tensors = _assemble(step_dir)
    else:
        model = _read_tensors(step_dir / MODEL_FILE, blobs.get(MODEL_FILE) or (step_dir / MODEL_FILE).read_bytes())
    optimizer = None
    if with_optimizer and (step_dir / OPTIMIZER_JSON).is_file():
        if not is_sharded:
            if OPTIMIZER_TENSORS not in blobs:
                raise TinygraftError(f"checkpoint {str(step_dir)!r} is incomplete: {OPTIMIZER_TENSORS} is missing")
            tensors = _read_tensors(step_dir / OPTIMIZER_TENSORS, blobs[OPTIMIZER_TENSORS])
        optimizer = optimizer_from_files(tensors, read_json(step_dir / OPTIMIZER_JSON, "checkpoint file"))
    return Checkpoint(step_dir, model, state, read_json(step_dir / CONFIG_FILE, "checkpoint file"), optimizer)


def _assemble(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A sharded checkpoint's whole tensors: the model's, and the optimizer's as optimizer.safetensors names them."""
    try:
        model, state = sharded.unflatten(sharded.assemble(step_dir))
    except (SafetensorError, ValueError, RuntimeError, KeyError) as e:
        raise TinygraftError(f"the shards in '{step_dir / sharded.SHARDS}' are corrupt or incomplete ({e})") from None
    return model, {f"state.{i}.{k}": v for i, per in state.items() for k, v in per.items()}
