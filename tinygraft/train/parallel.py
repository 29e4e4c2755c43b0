"""Data parallelism for the one training loop: what changes in a step when N processes share it (torchrun; DDP).

One process per rank; every rank draws the same global micro-batch of train.batch_size rows and keeps rows
r*b .. (r+1)*b-1 of it (b = batch_size / N; core/dist.py). So that N processes compute what one computes:

    loss_r   = the job's mean loss over rank r's rows          (its objective, terms and penalties, as ever)
    weight_r = N * count_r / count                             count: the units the mean is over (targets, examples)
    backward (loss_r * weight_r / grad_accum)                  DDP averages the gradients over the N ranks:
                                                               sum_r weight_r / N * grad(mean_r) = grad(mean)

and dropout keys its masks on the global row (kernels/rng.global_rows). DDP synchronises on the last micro-step
only (`no_sync` before it); modules that train beside the model (distillation's projections, `Job.aux`) are
averaged by one all-reduce of their gradients. One small all-reduce per step sums the loss and the tokens and
carries each rank's Ctrl-C, so every rank sees the same loss (a NaN stops them all at the same step) and stops
after the same step.

A penalty the same on every rank (EWC, a method's own) is weighted too, and comes out once: sum_r weight_r = N.
A loss that is not a mean over rows or targets (in-batch negatives: each row's negatives are its rank's rows) is
what its rank's slice gives, not the one-process value.

`--fsdp` (FSDP2) shards instead of replicating: `fully_shard` on every block of every GPT / BERT in the model, then
on the rest, before the optimizer is built (it holds the sharded parameters); bf16 parameters with fp32 gradient
reduction on CUDA under bf16, fp32 on the CPU. The step is the same; the gradient sync is FSDP's reduce-scatter
(`set_requires_gradient_sync` in place of `no_sync`), the norm to clip by is gathered from the shards, and
checkpoints are sharded (core/sharded.py): every rank saves and loads its own part.
"""

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tinygraft.core import dist, sharded
from tinygraft.kernels import rng

# Buffers (positions, masks) are constants, the same on every rank: no broadcast before each forward (torch 2.13
# renamed the switch; the GPU image's 2.11 knows only the old name).
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


def count_rows(batch) -> int:
    return dist.rows(batch)


class Parallel:
    """The step's data parallelism: a no-op object in one process."""

    def __init__(self, global_batch: int, varying: bool = False, fsdp: bool = False):
        self.n = dist.world() if dist.active() else 1
        self.on = self.n > 1
        self.rank = dist.rank() if self.on else 0
        self.rows = dist.split(global_batch) if self.on else global_batch
        self._ddp: nn.Module | None = None
        self._trainable: tuple = ()
        self.varying = varying  # the parameters a step uses vary from batch to batch
        self.sharding = self.on and fsdp  # FSDP2: the model's parameters are DTensors, each rank holds a shard
        dist.set_lockstep(self.sharding)

    # ------------------------------------------------------------------------------------------ the micro-batch
    def take(self, batch, count) -> tuple:
        """(this rank's rows of a global batch, its loss weight), and the row range for dropout's masks."""
        if not self.on:
            return batch, 1.0, (0, 0)
        first = self.rank * self.rows
        part = dist.shard(batch, first, first + self.rows)
        total = count(batch)
        weight = self.n * count(part) / total if total else 0.0
        return part, weight, (first, self.rows)

    @staticmethod
    def rows_of(span: tuple[int, int]):
        return rng.global_rows(*span) if span[1] else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------------ DDP
    def wrap(self, model: nn.Module, device: torch.device, probe: Callable[[], torch.Tensor]) -> nn.Module:
        """The model the step runs: DDP over `model`, rebuilt when the trainable set changes (gradual unfreezing
        turns layers on as it goes, and DDP registers its gradient hooks once).

        DDP must be told whether a step leaves trainable parameters without a gradient (a head or pooler the task
        never reads): `probe()`, the first micro-batch's loss through `model` (its RNG draws undone), is run back
        once to see, and its gradients dropped. Where the set can change from batch to batch (mixed-adapter
        batches) DDP looks every step."""
        if not self.on or self.sharding:
            return model
        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        if self._ddp is not None and trainable == self._trainable:
            return self._ddp
        unused = self.varying
        if not unused:
            params = [p for p in model.parameters() if p.requires_grad]
            probe().backward()
            unused = any(p.grad is None for p in params)
            for p in params:
                p.grad = None
            unused = dist.all_sum([float(unused)])[0] > 0
        self._ddp = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
            **NO_BUFFER_SYNC,
        )
        self._trainable = trainable
        return self._ddp

    def sync(self, step_model: nn.Module, last: bool):
        """DDP all-reduces the gradients on the last micro-step of a step only."""
        if self.sharding:
            step_model.set_requires_gradient_sync(last)
        elif self.on and not last and hasattr(step_model, "no_sync"):
            return step_model.no_sync()
        return contextlib.nullcontext()

    def average(self, params) -> None:
        """Average gradients DDP does not see (the job's aux modules) over the ranks."""
        if not self.on:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.n
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    # ---------------------------------------------------------------------------------------------------- FSDP2
    def shard(self, model: nn.Module, device: torch.device, bf16: bool) -> None:
        """fully_shard each block of every tinygraft GPT / BERT inside `model` (their ModuleLists), then the model."""
        if not self.sharding:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415 (FSDP runs only)

        policy = MixedPrecisionPolicy()
        if bf16 and device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        owners = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
        lists = {id(m): m for o in owners for m in o.modules() if isinstance(m, nn.ModuleList)}
        for blocks in lists.values():
            for block in blocks:
                fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)

    def reshard(self, model: nn.Module) -> None:
        """Put every FSDP group back in its sharded form. A forward without a backward (evaluation) leaves the root
        group gathered, its modules holding plain tensors that a later all-gather reuses: a checkpoint must read
        the shards, not those (reading them crashed DCP's writer)."""
        if not self.sharding:
            return
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415 (FSDP runs only)

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @staticmethod
    def clip(params: list, max_norm: float) -> float:
        """clip_grad_norm_ over `params`, sharded (DTensor) gradients among them: the norm of the whole."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def load_sharded(self, method, model: nn.Module, optimizer, step_dir, saved: dict) -> None:
        """Resume an FSDP run from a sharded checkpoint, each rank reading the part its own sharding asks for
        (whatever the number of processes that wrote it); `saved` is the checkpoint's optimizer state as
        checkpoint.load read it, whose param groups and scalars it keeps. The optimizer's state is made first (a
        step of lr 0 on zero gradients: the saved groups' rates replace the 0), so that there is something of the
        right shape to read into."""
        for g in optimizer.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flat = sharded.flatten(method.state_dict(model), optimizer.state_dict())
        sharded.load(step_dir, flat)
        weights, state = sharded.unflatten(flat)
        method.load_state_dict(model, weights)
        merged = {i: {**saved["state"].get(i, {}), **per} for i, per in state.items()}
        optimizer.load_state_dict({"state": merged, "param_groups": saved["param_groups"]})

    # ------------------------------------------------------------------------------------------- agreement
    def agree(self, loss: float, tokens: int, stop: bool) -> tuple[float, int, bool]:
        """The step's global loss and tokens, and whether any rank was asked to stop (one all-reduce)."""
        if not self.on:
            return loss, tokens, stop
        total, count, stops = dist.all_sum([loss / self.n, float(tokens), float(stop)])
        return total, int(count), stops > 0
