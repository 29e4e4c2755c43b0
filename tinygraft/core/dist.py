"""Several processes, one run: what the rest of tinygraft asks of torch.distributed, in one place.

`torchrun --nproc_per_node N -m tinygraft pretrain|finetune ...` starts N copies of the command, each with RANK,
WORLD_SIZE, LOCAL_RANK and a rendezvous in its environment; `start()` joins them into one process group (NCCL on
CUDA, gloo on the CPU). One process (no WORLD_SIZE) is the same code with world() == 1 and every helper a no-op.

The rule that makes N processes compute what one computes: **every rank builds the same global batch** (the same
batcher, seed and position on every rank) and keeps its own contiguous slice of rows, rank r rows r*b .. (r+1)*b-1
(`shard`). The data position and the RNG streams are then the same on every rank, which is why a checkpoint saved
by N processes resumes on any number of them: it holds one position and one RNG state, not N.
"""

import datetime
import os
import sys

import torch

from tinygraft.errors import TinygraftError

TIMEOUT_S = 60  # a collective that waits longer than this on a lost peer fails instead of hanging


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def start(device_name: str = "auto") -> None:
    """Join the process group torchrun set up (a no-op in one process). The device decides the backend: NCCL when
    this rank trains on CUDA, gloo otherwise."""
    if world() <= 1 or active():
        return
    if not torch.distributed.is_available():
        raise TinygraftError("WORLD_SIZE is set, but this PyTorch was built without torch.distributed")
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(
        backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S)
    )


def stop() -> None:
    if active():
        torch.distributed.destroy_process_group()


def device_for(name: str) -> str:
    """`auto` / `cuda` on several processes means this rank's own GPU (LOCAL_RANK)."""
    if world() > 1 and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{local_rank()}"
    return name


# What a collective raises when a peer has gone (it exited, crashed, or stopped answering for TIMEOUT_S).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is this rank's collective failing because another rank stopped: that rank has said why (or
    torchrun's report says how it died), so this one stops without a word of its own."""
    if not active():
        return False
    return isinstance(error, RuntimeError) and any(s in str(error) for s in LOST_PEER)


def timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective that waited TIMEOUT_S for the other ranks (a hung or mismatched peer)."""
    return active() and isinstance(error, RuntimeError) and "timed out" in str(error).lower()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"


def all_sum(values: list[float]) -> list[float]:
    """The sum over ranks of a few numbers (losses, counts, flags), in float64 so the order of ranks barely shows."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (picklable objects; tensors should be on the CPU)."""
    if not active():
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


# Under FSDP every forward is itself a collective (it gathers each block's weights), so the ranks must run the same
# forwards: evaluation is then not split, every rank scores every batch (train/parallel.py sets this).
_LOCKSTEP = False


def set_lockstep(on: bool) -> None:
    global _LOCKSTEP
    _LOCKSTEP = on


def splitting() -> bool:
    """Whether evaluation is split between the ranks (several processes, not in lockstep)."""
    return active() and not _LOCKSTEP


def share(n: int) -> range:
    """This rank's contiguous share of n items (evaluation batches): rank r takes [r*n//N, (r+1)*n//N), so the
    shares concatenated in rank order are the items in order, each once."""
    w, r = (world(), rank()) if splitting() else (1, 0)
    return range(r * n // w, (r + 1) * n // w)


def mine(items) -> list:
    """This rank's share of `items` (all of them in one process, or in lockstep)."""
    items = list(items)
    return [items[i] for i in share(len(items))] if splitting() else items


def eval_sum(values: list[float]) -> list[float]:
    """Sums over the ranks' shares of an evaluation (`mine`): the whole evaluation's sums on every rank."""
    return all_sum(values) if splitting() else list(values)


def split(global_batch: int, what: str = "train.batch_size") -> int:
    """Rows per rank of a global batch, refused in one sentence when N processes cannot share it evenly."""
    n = world()
    if global_batch % n:
        lower, upper = global_batch - global_batch % n, global_batch + n - global_batch % n
        raise TinygraftError(
            f"{what} {global_batch} is the global batch, which {n} processes cannot split evenly; use a multiple "
            f"of {n} (e.g. {lower or upper} or {upper}: {(lower or upper) // n} or {upper // n} rows per process)"
        )
    return global_batch // n


def rows(batch) -> int:
    """How many rows (examples, sequences) a batch holds: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise TypeError("a batch without tensors has no rows")


def shard(batch, start: int, stop: int):
    """Rows [start, stop) of a batch: every tensor and list whose leading size is the batch's rows is cut; the rest
    (a task's constants) is kept whole."""
    n = rows(batch)

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[start:stop]
        if isinstance(v, list) and len(v) == n:
            return v[start:stop]
        return v

    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


_ERRORS = None  # the terminal's stderr, kept for this rank's own error when its output is silenced


def quiet_others() -> None:
    """Rank 0 alone prints: the others' stdout and stderr, Python's and the C++ runtime's (file descriptors 1 and
    2), go to /dev/null; their own errors still reach the terminal, through `error_stream`."""
    global _ERRORS
    if world() <= 1 or is_main() or _ERRORS is not None or os.environ.get("TINYGRAFT_QUIET_RANKS") == "0":
        return  # (TINYGRAFT_QUIET_RANKS=0: every rank prints, to debug one that fails)
    sys.stdout.flush()
    sys.stderr.flush()
    _ERRORS = os.fdopen(os.dup(2), "w", buffering=1)
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)


def error_stream():
    return _ERRORS or sys.stderr


def picklable_cpu(obj):
    """`obj` with every tensor moved to the CPU, so `gather` can send it between ranks of any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: picklable_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(picklable_cpu(v) for v in obj)
    return obj
