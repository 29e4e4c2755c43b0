"""`tinygraft info`: what a run or checkpoint holds — config, size, progress, losses, backend, unused entries."""


import torch

from tinygraft.core import checkpoint
from tinygraft.kernels.backend import describe
from tinygraft.train.config import flatten
from tinygraft.train.pretrain import load_trained
from tinygraft.train.run_dir import RunDir


def info(path: str, which: str = "latest") -> dict:
    trained = load_trained(path, torch.device("cpu"), which)
    ckpt, state = trained.ckpt, trained.ckpt.trainer_state
    # The run directory is two levels above a step directory (RUN/checkpoints/step-*).
    run_dir = RunDir(ckpt.path.parent.parent) if ckpt.path.parent.name == "checkpoints" else None
    rows = run_dir.metrics() if run_dir else []
    last = {}
    for split in ("train", "val"):
        kept = [r for r in rows if r.get("split") == split and r.get("step", 0) <= ckpt.step]
        if kept:
            last[split] = {k: v for k, v in kept[-1].items() if k != "split"}
    params = list({id(p): p for p in trained.model.parameters()}.values())
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "steps": trained.run.train.steps,
        "preset": trained.run.preset,
        "task": trained.run.task,
        "method": trained.run.method,
        "total_params": sum(p.numel() for p in params),
        "tokens_seen": state.get("tokens_seen"),
        "tokenizer": f"{trained.tokenizer.kind}, vocab {trained.tokenizer.vocab_size}",
        "last": last,
        "best": state.get("best"),
        "backend": describe(),
        "unused": trained.unused,
        "checkpoints": [checkpoint.step_dir_name(s) for s in checkpoint.list_steps(ckpt.path.parent)],
        "config": ckpt.config,
    }


def format_info(d: dict) -> str:
    def losses(row: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())

    lines = [
        f"checkpoint   {d['checkpoint']} (step {d['step']} of {d['steps']})",
        f"run          {d['task']}, method {d['method']}, preset {d['preset']}",
        f"parameters   {d['total_params']:,}",
        f"tokenizer    {d['tokenizer']}",
        f"tokens seen  {d['tokens_seen']:,}" if d["tokens_seen"] is not None else "tokens seen  unknown",
    ]
    for split, row in d["last"].items():
        lines.append(f"last {split:<7} {losses(row)}")
    best = d.get("best") or {}
    if best.get("value") is not None:
        lines.append(f"best         {best['metric']} {best['value']:.4g} at step {best['step']}")
    lines += [
        f"backend      {d['backend']}",
        f"unused       {', '.join(d['unused']) if d['unused'] else 'none (every checkpoint entry is used)'}",
        f"saved        {', '.join(d['checkpoints'])}",
        "config",
    ]
    lines += [f"  {k} = {v!r}" for k, v in flatten(d["config"]).items()]
    return "\n".join(lines)


