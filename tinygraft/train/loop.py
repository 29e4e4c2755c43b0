"""The training loop: the one every job (pre-training, fine-tuning, LoRA, distillation) runs.

One optimizer step, top to bottom:

    method.apply_schedule(model, step)       # which parameters train now (gradual unfreezing, ...)
    lr = schedule(step); set it per group     # warmup + cosine/linear to a floor; group lr = lr * lr_scale
    for each of grad_accum micro-batches:
        batch = batcher.next()
        loss = job.loss_fn(model, batch)      # under bf16 autocast per train.precision (core/precision.py)
        loss += the job's extra terms (distillation), the method's penalty and every regulariser's (EWC)
        (loss / grad_accum).backward()
    clip the global grad norm; optimizer.step(); zero the grads
    every log_every steps: a train row in metrics.jsonl; every eval_every steps (and the last): evaluate, checkpoint

A job of 0 steps (a method that trains nothing: zero-shot, few-shot) takes no step and builds no optimizer: it
evaluates the model as it is once and keeps that checkpoint (step 0) and its results.

A job that `converge`s (the linear probe fitted by L-BFGS on cached features) runs one step, the fit, in place of the
micro-batches and the optimizer step; its rows, evaluation and checkpoint are those of any step.

What changes between jobs is in `Job` (the model, its batcher, loss and evaluation) and in the `Method`
(train/methods/); nothing here knows which model or task it trains.

Exact resume: a checkpoint stores the weights, the optimizer state, the batcher's position and the python / numpy /
torch RNG states at a step boundary, and evaluation runs with the RNG states saved and restored, so a run stopped at
step K and resumed draws exactly the batches, dropout masks and learning rates an uninterrupted run would.
"""

import contextlib
import math
import random
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from tinygraft.core import checkpoint, dist, precision
from tinygraft.core.layers import set_activation_checkpointing
from tinygraft.errors import TinygraftError
from tinygraft.train.config import TrainConfig
from tinygraft.train.methods.base import Method
from tinygraft.train.optim import build_optimizer, lr_at, param_groups, set_lr
from tinygraft.train.parallel import Parallel, count_rows
from tinygraft.train.plots import plot_metrics
from tinygraft.train.progress import Progress
from tinygraft.train.run_dir import PLOT, RunDir

AUX_FILE = "aux.safetensors"
REPEAT_S = 2.0


@dataclass
class Job:
    """What the loop trains: everything task-specific, behind five small callables and objects."""

    model: nn.Module
    method: Method
    batcher: Any  # .next() -> batch, .state_dict(), .load_state_dict(d)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]  # mean loss of a batch (already on the device)
    evaluate: Callable[[nn.Module], dict[str, float]]  # validation metrics, "loss" among them; runs under no_grad
    count_tokens: Callable[[Any], int]  # tokens in a batch, for tokens/s
    config: dict  # the full resolved config, saved in every checkpoint
    task: str = "pretrain"
    metric: str = "loss"  # the tracked validation metric (the `best` pointer)
    higher_is_better: bool = False
    keep_best: bool = False  # results.json reports the best checkpoint (fine-tuning) or the final one
    tokenizer_json: str | None = None
    extra_results: dict = field(default_factory=dict)  # job-specific entries for results.json
    extra_state: dict = field(default_factory=dict)  # job-specific entries for trainer_state.json
    should_stop: Callable[[int, dict], bool] | None = None  # early stopping: (step, best) after each evaluation
    # Loss terms beside the objective's, each (model, batch) -> scalar tensor: a distillation term, say.
    loss_terms: list[Callable[[nn.Module, Any], torch.Tensor]] = field(default_factory=list)
    # Regularisers that combine with any method, each with .penalty(model) -> scalar tensor | None (EWC, say).
    regularizers: list[Any] = field(default_factory=list)
    # Modules that train beside the model but are no part of it (distillation's projections): their own optimizer
    # group, saved in every checkpoint as AUX_FILE, never in the model's weights (so export and predict ignore them).
    aux: nn.Module | None = None
    # A fit to convergence that replaces the optimizer steps (linear-probe's L-BFGS on cached features,
    # train/probe_fit.py): a run of one step, this one, (model) -> {"loss": train loss, "tokens": tokens read,
    # "grad_norm": the fit's last gradient}. Not Method.fit, which builds a scorer for a run of 0 steps.
    converge: Callable[[nn.Module], dict] | None = None
    # What loss_fn's mean is over in a batch (target tokens, examples): under N processes each rank's mean is
    # weighted by its share of it, so the step's gradient is the one-process gradient (train/parallel.py).
    loss_count: Callable[[Any], int] = count_rows


@dataclass
class Outcome:
    status: str  # "completed", "stopped" (--stop-at), "early-stopped" (Job.should_stop) or "interrupted" (Ctrl-C)
    step: int
    results: dict


# ------------------------------------------------------------------------------------------------ RNG and batches
def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in np_state[2:]]],
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in state["cuda"]])


def restore(step_dir: Path, field: str, load) -> None:
    """Load one field of trainer_state.json (types checked by checkpoint.load; the insides only here)."""
    try:
        load()
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError):
        raise TinygraftError(
            f"checkpoint file '{step_dir / checkpoint.TRAINER_STATE}' holds an invalid {field!r}, so the run "
            "cannot continue from it; restore the file, or start the run over with --overwrite"
        ) from None


@contextlib.contextmanager
def rng_preserved():
    """Evaluation must not move the training RNG streams (it runs at steps a resumed run may not repeat)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def measure(model: nn.Module, evaluate, device: torch.device) -> dict[str, float]:
    """`evaluate(model)` before training starts (what a run reports as `before`): on the device, in eval mode,
    without moving the RNG streams; the model is left in train mode."""
    model.to(device).eval()
    with rng_preserved(), torch.no_grad():
        out = {k: float(v) for k, v in evaluate(model).items()}
    model.train()
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def lengths_dynamic(batch):
    """Tell torch.compile that a padded batch's length (dim 1) varies, so the few bucket lengths share one graph
    instead of each compiling its own; `maybe_` because a model may still specialise it (positions, say)."""
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(v, 1)
    return batch


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (Dynamo's own tally), 0 where it has none."""
    try:
        return float(torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0))
    except (AttributeError, RuntimeError):  # a private tally: absent or renamed in another torch
        return 0.0


def jsonable(value):
    """Batcher states hold numpy scalars and arrays; trainer_state.json wants plain JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


# ---------------------------------------------------------------------------------------------- Ctrl-C handling
class StopRequest:
    """First Ctrl-C: finish the current step, save a checkpoint, exit. Second Ctrl-C: abort at once."""

    def __init__(self, progress: Progress):
        self.requested, self.first = False, 0.0
        self.progress = progress
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        # torchrun passes the terminal's Ctrl-C on to its workers, which the terminal has already sent it: under
        # torchrun a second SIGINT within REPEAT_S is that echo, not a second Ctrl-C.
        if self.requested and not (dist.world() > 1 and time.monotonic() - self.first < REPEAT_S):
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested, self.first = True, time.monotonic()
        self.progress.write("interrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# ------------------------------------------------------------------------------------------------------ the loop
def resolve_device(name: str) -> torch.device:
    name = dist.device_for(name)  # several processes on one machine: each its own GPU
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinygraftError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinygraftError(f"--device {name!r} asked for CUDA, but no CUDA device is available")
    return device


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(
    job: Job,
    cfg: TrainConfig,
    run: RunDir,
    *,
    resume: checkpoint.Checkpoint | None = None,
    stop_at: int | None = None,
    progress: Progress | None = None,
) -> Outcome:
    device = resolve_device(cfg.device)
    par = Parallel(cfg.batch_size, job.method.varying_graph, cfg.fsdp)
    if par.sharding and job.aux is not None and len(list(job.aux.parameters())):
        raise TinygraftError("--fsdp does not shard distillation's projections yet; distil with DDP (without --fsdp)")
    model = job.method.attach(job.model).to(device)
    checkpointed = cfg.activation_checkpointing
    if not set_activation_checkpointing(model, checkpointed) and checkpointed:
        raise TinygraftError("train.activation_checkpointing checkpoints the blocks of a tinygraft GPT or BERT; "
                             "this model has none")  # fmt: skip
    groups = job.method.param_groups(model)
    listed = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():  # a parameter no group lists can never train
        if id(p) not in listed:
            p.requires_grad_(False)
    if par.sharding:  # FSDP2 replaces the parameters by sharded ones: the groups are made again from them
        par.shard(model, device, precision.resolve(cfg.precision, device).name == "bf16")
        groups = job.method.param_groups(model)
    aux = job.aux.to(device) if job.aux is not None and len(list(job.aux.parameters())) else None
    if aux is not None:
        groups = [*groups, {"params": list(aux.parameters()), "name": "aux"}]
    optimizer = None  # a job of 0 steps steps nothing (torch's AdamW refuses an empty parameter list)
    if cfg.steps > 0:
        betas = (cfg.beta1, cfg.beta2)
        choice = "torch" if par.sharding else cfg.optimizer  # torch's AdamW steps DTensors; our kernel does not
        optimizer = build_optimizer(param_groups(model, groups, cfg.weight_decay), choice, device, cfg.lr, betas,
                                    cfg.eps)  # fmt: skip
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    best = {"metric": job.metric, "value": None, "step": None}
    if resume is not None:
        if resume.optimizer is None:
            raise TinygraftError(f"checkpoint {str(resume.path)!r} holds no optimizer state, so it cannot be resumed")
        check_optimizer_state(optimizer, resume.optimizer, repr(str(resume.path)))
        if par.sharding and resume.trainer_state.get("sharded"):  # each rank reads its own part of the shards
            par.load_sharded(job.method, model, optimizer, resume.path, resume.optimizer)
        elif par.sharding:
            raise TinygraftError(f"checkpoint {str(resume.path)!r} was saved without --fsdp; resume it without it")
        else:
            job.method.load_state_dict(model, {k: v.to(device) for k, v in resume.model.items()})
            optimizer.load_state_dict(resume.optimizer)
        if aux is not None:
            load_aux(aux, resume.path, device)
        state = resume.trainer_state
        step, tokens_seen, elapsed_before = state["step"], state.get("tokens_seen", 0), state.get("train_seconds", 0.0)
        best = state.get("best", best)
        restore(resume.path, "data", lambda: job.batcher.load_state_dict(state["data"]))
        restore(resume.path, "rng", lambda: set_rng_state(state["rng"]))
        run.truncate_metrics(step)
        if step >= cfg.steps:
            raise TinygraftError(f"the run in {str(run.path)!r} already finished its {cfg.steps} steps; nothing to do")
        if stop_at is not None and stop_at <= step:
            raise TinygraftError(f"--stop-at {stop_at} is not after the checkpoint's step {step}; nothing to do")
    if cfg.tensorboard:  # after a resume's cut of metrics.jsonl, which the event files are rebuilt from
        run.open_board(job.config, step)
    eval_model = step_model = torch.compile(model) if cfg.compile else model
    compiled_before = compile_seconds()
    prec = precision.resolve(cfg.precision, device)
    autocast = precision.autocast(device, prec)
    schedule = dict(
        lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.schedule
    )
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    progress = progress or Progress(total=cfg.steps, initial=step)
    last_val: dict = {}

    def evaluate() -> dict:
        model.eval()
        with rng_preserved(), torch.no_grad(), autocast():
            metrics = {k: float(v) for k, v in job.evaluate(eval_model).items()}
        model.train()
        par.reshard(model)
        return metrics

    saved_step = step

    def save(is_best: bool) -> None:
        nonlocal saved_step
        saved_step = step
        if not run.writer and not par.sharding:  # rank 0 writes; the others hold the same state (core/dist.py)
            return
        state = {
            "tokens_seen": tokens_seen,
            "train_seconds": elapsed_before + (time.perf_counter() - t_start),
            "data": jsonable(job.batcher.state_dict()),
            "rng": rng_state(),
            "schedule": schedule,
            "best": best,
            **job.extra_state,
        }
        checkpoint.save(
            run.checkpoints,
            step,
            model=job.method.state_dict(model),
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            trainer_state=state,
            config=job.config,
            tokenizer_json=job.tokenizer_json,
            extra_files={**job.method.extra_files(model), **aux_files(aux)},
            keep=cfg.keep,
            best=is_best,
            shard=par.sharding,  # every rank writes its shards
        )

    model.train()
    t_start = t_window = time.perf_counter()
    window_loss, window_steps, window_tokens = 0.0, 0, 0
    status = "completed"
    stop_agreed = False  # several processes: a Ctrl-C any of them took, as the last step's all-reduce carried it
    with StopRequest(progress) as stop:
        if cfg.steps == 0:  # (inside the handler: a first Ctrl-C lets the one evaluation finish and be saved)
            last_val = evaluate()
            run.log(dict(step=0, split="val", **last_val, elapsed_s=time.perf_counter() - t_start))
            best = {"metric": job.metric, "value": last_val.get(job.metric), "step": 0, "metrics": dict(last_val)}
            progress.write("step 0/0: val " + " ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
            save(is_best=True)
        while step < last:
            if stop_agreed if par.on else stop.requested:
                status = "interrupted"
                break
            job.method.apply_schedule(model, step)
            if job.converge is not None:  # no optimizer step: the trainable weights are fitted at once (lr 0 here)
                with autocast():
                    fitted = job.converge(model)
                lr, step_loss, step_tokens, grad_norm = 0.0, fitted["loss"], fitted["tokens"], fitted["grad_norm"]
            else:
                lr = lr_at(step, **schedule)
                set_lr(optimizer, lr)
                step_loss, step_tokens = 0.0, 0
                for micro in range(cfg.grad_accum):
                    batch, weight, span = par.take(job.batcher.next(), job.loss_count)
                    batch = to_device(batch, device)
                    if cfg.compile:
                        lengths_dynamic(batch)

                    def forward(through: nn.Module, batch=batch) -> torch.Tensor:
                        with autocast():
                            loss = job.loss_fn(through, batch)
                            return add_terms(loss, job, model, through, batch).float()

                    def probe() -> torch.Tensor:
                        with rng_preserved():
                            return forward(eval_model)

                    with par.rows_of(span):
                        step_model = par.wrap(eval_model, device, probe) if micro == 0 else step_model
                    with par.rows_of(span), par.sync(step_model, last=micro == cfg.grad_accum - 1):
                        loss = forward(step_model)
                        loss_value = loss.item()
                        if not par.on:  # several processes check the loss they agree on, below
                            check_finite("loss", loss_value, step + 1, run)
                        (loss * weight / cfg.grad_accum).backward()
                    step_loss += loss_value * weight / cfg.grad_accum
                    step_tokens += job.count_tokens(batch)
                step_loss, step_tokens, stop_agreed = par.agree(step_loss, step_tokens, stop.requested)
                check_finite("loss", step_loss, step + 1, run)
                if aux is not None:
                    par.average(aux.parameters())
                trainable = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = par.clip(trainable, max_norm) if trainable else 0.0
                check_finite("gradient norm", grad_norm, step + 1, run)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            window_loss, window_steps, window_tokens = (
                window_loss + step_loss,
                window_steps + 1,
                window_tokens + step_tokens,
            )

            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - t_window, 1e-9)
            progress.update(step, step_loss, lr, tokens_per_s)
            if step % cfg.log_every == 0 or step == last:
                run.log(
                    dict(
                        step=step,
                        split="train",
                        loss=window_loss / window_steps,
                        lr=lr,
                        tokens_per_s=tokens_per_s,
                        grad_norm=grad_norm,
                        elapsed_s=elapsed_before + now - t_start,
                    )
                )
                t_window, window_loss, window_steps, window_tokens = now, 0.0, 0, 0
            # An evaluation where --stop-at or Ctrl-C ends a run is shown and saved but not ranked: only the
            # scheduled ones pick the best checkpoint, so a stopped-and-resumed run keeps what a straight one would.
            scheduled = step % cfg.eval_every == 0 or step == cfg.steps
            if scheduled or step == last:
                last_val = evaluate()
                if not math.isfinite(last_val.get("loss", 0.0)):
                    raise TinygraftError(
                        f"the validation loss became {last_val['loss']} at step {step}; the last good checkpoint is "
                        f"{_latest_name(run)} (try a lower train.lr)"
                    )
                elapsed = elapsed_before + time.perf_counter() - t_start
                run.log(dict(step=step, split="val", **last_val, elapsed_s=elapsed))
                value = last_val.get(job.metric)
                improved = (
                    scheduled
                    and value is not None
                    and (
                        best["value"] is None
                        or (value > best["value"] if job.higher_is_better else value < best["value"])
                    )
                )
                if improved:
                    best = {"metric": job.metric, "value": value, "step": step, "metrics": dict(last_val)}
                shown = " ".join(f"{k} {v:.4f}" for k, v in last_val.items())
                progress.write(f"step {step}/{cfg.steps}: val {shown}")
                save(is_best=improved)
                if scheduled and job.should_stop is not None and job.should_stop(step, best):
                    status = "early-stopped"
                    break
        if status == "interrupted" and step > saved_step:
            save(is_best=False)
    progress.close()
    dist.barrier()  # no rank leaves before rank 0 has saved (torchrun stops the others when one exits non-zero)
    if status == "completed" and step < cfg.steps:
        status = "stopped"

    train_seconds = elapsed_before + time.perf_counter() - t_start
    compiling = compile_seconds() - compiled_before if cfg.compile else 0.0
    results = {
        "task": job.task,
        "method": job.method.name,
        "metric": job.metric,
        "metrics": best.get("metrics") or last_val if job.keep_best else last_val,
        "kept": "best" if job.keep_best else "final",
        "best_step": best["step"],
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 else 0.0,
        "trainable_params": sum(p.numel() for p in _unique(model.parameters()) if p.requires_grad),
        "total_params": sum(p.numel() for p in _unique(model.parameters())),
        "optimizer_state_mb": checkpoint.optimizer_state_bytes(optimizer.state_dict()) / 2**20 if optimizer else 0.0,
        "peak_memory_mb": peak_memory_mb(device),
        "precision": prec.name,
        "compile_seconds": compiling,  # inside train_seconds: compiling the graphs, train's and evaluation's
        "status": status,
        "step": step,
        "steps": cfg.steps,
        "tokens_seen": tokens_seen,
        **job.extra_results,
    }
    run.write_results(results)
    run.close_board()
    rows = run.metrics()
    if rows and run.writer:
        plot_metrics(rows, run.path / PLOT, job.metric)
    dist.barrier()
    return Outcome(status, step, results)


def check_finite(what: str, value: float, step: int, run: RunDir) -> None:
    if not math.isfinite(value):
        raise TinygraftError(
            f"the {what} became {value} at step {step}; the last good checkpoint is {_latest_name(run)} "
            "(try a lower train.lr)"
        )


def add_terms(loss: torch.Tensor, job: Job, model: nn.Module, step_model: nn.Module, batch) -> torch.Tensor:
    """The objective's loss plus the job's extra terms, the method's penalty and the regularisers' penalties."""
    for term in job.loss_terms:
        loss = loss + term(step_model, batch)
    for source in (job.method, *job.regularizers):
        extra = source.penalty(model)
        if extra is not None:
            loss = loss + extra
    return loss


def aux_files(aux: nn.Module | None) -> dict:
    if aux is None:
        return {}
    return {AUX_FILE: st_save({k: v.detach().contiguous().cpu() for k, v in aux.state_dict().items()})}


def load_aux(aux: nn.Module, step_dir: Path, device: torch.device) -> None:
    """The aux modules' tensors of a checkpoint (checkpoint.load has checked the file's sha256)."""
    path = step_dir / AUX_FILE
    if not path.is_file():
        raise TinygraftError(f"checkpoint {str(step_dir)!r} is incomplete: {AUX_FILE} is missing")
    tensors = st_load(path.read_bytes())
    try:
        aux.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    except RuntimeError:
        raise TinygraftError(f"{AUX_FILE} in {str(step_dir)!r} does not fit this run's modules") from None


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, where: str) -> None:
    """A checkpoint's optimizer state must fit this run's parameters group by group, tensor by tensor: loading
    maps state by position, so a run that lists its parameters in another order would otherwise take another
    tensor's moments without a word."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise TinygraftError(
            f"the optimizer state in {where} has {len(groups)} parameter groups, this run "
            f"{len(optimizer.param_groups)}; it cannot continue exactly"
        )
    for ours, theirs in zip(optimizer.param_groups, groups):
        if len(ours["params"]) != len(theirs["params"]):
            raise TinygraftError(
                f"the optimizer state in {where} does not fit this run's parameters (group "
                f"{theirs.get('name', '?')!r} holds {len(theirs['params'])} tensors, this run "
                f"{len(ours['params'])}); it cannot continue exactly"
            )
        for p, index in zip(ours["params"], theirs["params"]):
            state = saved["state"].get(index, {})
            moment = state.get("exp_avg")
            if isinstance(moment, torch.Tensor) and tuple(moment.shape) != tuple(p.shape):
                raise TinygraftError(
                    f"the optimizer state in {where} holds a {tuple(moment.shape)} moment where "
                    f"this run's parameter is {tuple(p.shape)}; it cannot continue exactly"
                )


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _latest_name(run: RunDir) -> str:
    pointer = run.checkpoints / "latest"
    return repr(str(run.checkpoints / pointer.read_text().strip())) if pointer.is_file() else "none (none was saved)"
