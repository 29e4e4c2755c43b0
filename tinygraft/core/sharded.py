"""Sharded checkpoints (FSDP runs): each process writes its own part of the weights and optimizer state.

A step directory of a sharded run holds what any checkpoint holds (core/checkpoint.py), except that the tensors are
not in model.safetensors / optimizer.safetensors but in

    sharded/shard-0000R-model-00001-of-00001.safetensors     rank R's pieces: "model.<name>" and
                                                              "optim.state.<param index>.<key>", each with its
                                                              offset in the whole tensor in the file's metadata

written by torch.distributed.checkpoint's safetensors writer (HuggingFaceStorageWriter, save_distributed) and read
back by its reader, which rebuilds every tensor's place from those offsets: no pickle (DCP's default format keeps
its metadata in one), and any number of processes can read them, each the part its own sharding asks for (`load`),
or one process the whole (`assemble`: export, predict, a resume without FSDP). trainer_state.json records the
sha256 of every shard like any file.
"""

import warnings
from pathlib import Path

import torch

from tinygraft.core import dist

SHARDS = "sharded"
MODEL, OPTIM = "model.", "optim.state."


def flatten(model: dict[str, torch.Tensor], optimizer: dict | None) -> dict[str, torch.Tensor]:
    """One flat dict of the tensors to shard: the model's and the optimizer state's (the rest is JSON)."""
    out = {MODEL + k: v for k, v in model.items()}
    for index, per_param in (optimizer or {}).get("state", {}).items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                out[f"{OPTIM}{index}.{key}"] = value
    return out


def unflatten(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict]]:
    model = {k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)}
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(OPTIM):
            index, key = k[len(OPTIM) :].split(".", 1)
            state.setdefault(int(index), {})[key] = v
    return model, state


def _dcp():
    """torch.distributed.checkpoint, imported when a sharded checkpoint is read or written (it adds most of a second
    to every start-up otherwise)."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 (see the docstring)

    return dcp


def write(step_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every rank: its part of `tensors` (DTensors: the local shard; plain tensors: once, by one rank)."""
    dcp = _dcp()
    writer = dcp.HuggingFaceStorageWriter(str(step_dir / SHARDS), save_distributed=True)
    dcp.save({k: v.detach() for k, v in tensors.items()}, storage_writer=writer, no_dist=not dist.active())


def load(step_dir: Path, template: dict[str, torch.Tensor]) -> None:
    """Fill `template` in place from the shards, each tensor (or this rank's shard of it) where it belongs."""
    dcp = _dcp()
    dcp.load(template, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir / SHARDS)), no_dist=not dist.active())


def assemble(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole tensors, in this one process."""
    dcp = _dcp()
    reader = dcp.HuggingFaceStorageReader(str(step_dir / SHARDS))
    meta = reader.read_metadata().state_dict_metadata
    full = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is what this is for
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(full, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir / SHARDS)), no_dist=True)
    return full


def files(step_dir: Path) -> list[str]:
    """The shard files, as trainer_state.json names them ("sharded/<file>")."""
    where = step_dir / SHARDS
    return sorted(f"{SHARDS}/{p.name}" for p in where.iterdir() if p.is_file()) if where.is_dir() else []
