"""`tinygraft info PATH`: what PATH holds, whatever it is.

a run, its checkpoints/ or a step dir   config, size, progress, last losses, backend, unused entries; for an
                                        adapter run also its settings, trainable count, base (path + sha256) and
                                        the adapter's file size beside the base's
a fine-tuning run                       the same from its config (task, method, head, labels), without building
                                        the model
a Hugging Face directory, or `minilm`   config, parameter count, heads, tokenizer, unused keys and tensors
                                        (models/pretrained.py: describe_checkpoint), reading only headers
"""

from pathlib import Path

import torch

from tinygraft.core import checkpoint, precision
from tinygraft.errors import TinygraftError
from tinygraft.kernels.backend import describe
from tinygraft.models import hf
from tinygraft.models.pretrained import describe_checkpoint, format_description, locate
from tinygraft.train import runs
from tinygraft.train.config import flatten
from tinygraft.train.loop import resolve_device
from tinygraft.train.methods.adapter import is_adapter_checkpoint, read_base_record
from tinygraft.train.run_dir import RunDir


def info(path: str, which: str | None = "latest") -> dict:
    kind, resolved, step_dir = runs.locate_spec(path, which)
    if kind == "huggingface":
        d = describe_checkpoint(resolved)
    elif kind == "finetune":
        d = _finetune_info(step_dir)
    else:
        d = _pretrain_info(step_dir)
    # what a run started here would train in: the machine's, not the checkpoint's (which is the same either way)
    d["precision_here"] = precision.resolve("auto", resolve_device("auto")).line
    return d


def _progress(ckpt: checkpoint.Checkpoint) -> dict:
    """The entries every run shares: step, tokens, last train/val rows up to this step, best, saved steps."""
    state = ckpt.trainer_state
    # The run directory is two levels above a step directory (RUN/checkpoints/step-*).
    run_dir = RunDir(ckpt.path.parent.parent) if ckpt.path.parent.name == "checkpoints" else None
    rows = run_dir.metrics() if run_dir else []
    last = {}
    for split in ("train", "val"):
        kept = [r for r in rows if r.get("split") == split and r.get("step", 0) <= ckpt.step]
        if kept:
            last[split] = {k: v for k, v in kept[-1].items() if k != "split"}
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "tokens_seen": state.get("tokens_seen"),
        "last": last,
        "best": state.get("best"),
        "backend": describe(),
        "checkpoints": [checkpoint.step_dir_name(s) for s in checkpoint.list_steps(ckpt.path.parent)],
        "stored_params": sum(t.numel() for t in ckpt.model.values()),  # what model.safetensors holds
        "sizes": _sizes(ckpt.path),
    }


def _sizes(step_dir: Path) -> dict | None:
    """An adapter checkpoint's weights file beside its base's, in bytes (None: not an adapter run)."""
    if not is_adapter_checkpoint(step_dir):
        return None
    record = read_base_record(step_dir)
    base = None
    if record.get("path"):
        try:
            base = sum(f.stat().st_size for f in hf.weight_files(locate(record["path"])))
        except (OSError, TinygraftError):  # the base moved: say so where its path is shown
            base = None
    return {"adapter": (step_dir / checkpoint.MODEL_FILE).stat().st_size, "base": base}


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _pretrain_info(step_dir: Path) -> dict:
    loaded = runs.load(step_dir, device=torch.device("cpu"))
    ckpt, run = loaded.ckpt, loaded.run
    params = list({id(p): p for p in loaded.model.parameters()}.values())
    return {
        **_progress(ckpt),
        "kind": "pretrain",
        "steps": run.train.steps,
        "preset": run.preset,
        "task": run.task,
        "method": run.method,
        "source": run.source,
        "total_params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "tokenizer": f"{loaded.tokenizer.kind}, vocab {loaded.tokenizer.vocab_size}",
        "unused": loaded.unused,
        "method_settings": loaded.config.get("method_settings") or {},
        "base": read_base_record(step_dir) if is_adapter_checkpoint(step_dir) else None,
        "config": loaded.config,
    }


def _finetune_info(step_dir: Path) -> dict:
    ckpt = checkpoint.load(step_dir, with_optimizer=False)
    c = runs.upgrade(ckpt.config)
    ft = c.get("finetune") or {}
    return {
        **_progress(ckpt),
        "kind": "finetune",
        "steps": (c.get("train") or {}).get("steps"),
        "task": c.get("task"),
        "method": c.get("method"),
        "source": c.get("base"),
        "head": c.get("head"),
        "adapters": c.get("adapters"),
        "method_settings": ft.get("method_settings") or {},
        "config": c,
    }


def format_info(d: dict) -> str:
    here = [f"precision    train.precision auto here: {d['precision_here']}"] if "precision_here" in d else []
    if d.get("format") == "huggingface":
        return "\n".join([format_description(d), *here])

    def losses(row: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())

    lines = [f"checkpoint   {d['checkpoint']} (step {d['step']} of {d['steps']})"]
    if d["kind"] == "finetune":
        lines += [
            f"run          fine-tuning, task {d['task']}, method {d['method']}",
            f"from         {d['source']}",
            f"head         {d['head']}",
            f"stored       {d['stored_params']:,} parameters in the checkpoint",
        ]
        if d.get("adapters"):
            lines.append(f"adapters     {', '.join(d['adapters'])} (each with its head; pick one with --adapter-name)")
    else:
        lines += [
            f"run          {d['task']}, method {d['method']}, "
            + (f"model from {d['source']}" if d["source"] else f"preset {d['preset']}"),
            f"parameters   {d['total_params']:,} ({d['trainable_params']:,} trainable, {d['stored_params']:,} stored)",
            f"tokenizer    {d['tokenizer']}",
        ]
        if d["base"] is not None:
            base = d["base"]
            where = base["path"] or "none: built from the config, kept whole in each checkpoint"
            sha = f" (sha256 {base['sha256'][:16]}...)" if base.get("sha256") else ""
            lines.append(f"base         {where}{sha}")
    sizes = d.get("sizes")
    if sizes:
        base = f", the base's {_bytes(sizes['base'])}" if sizes["base"] else ""
        lines.append(f"weights      {_bytes(sizes['adapter'])} in the checkpoint{base}")
    distilled = (d["config"].get("finetune") or d["config"]).get("distill") or {}
    if distilled.get("teacher"):
        terms = ("kd", "task", "hidden", "attention")
        weights = ", ".join(f"{t} {distilled[t + '_weight']}" for t in terms if distilled.get(t + "_weight"))
        T = distilled.get("temperature")
        if T is None:  # the default: 1 over a vocabulary (a language model, instruct), 2 over a task's classes
            task = d["config"].get("task") if d["config"].get("kind") == "finetune" else None
            T = 2.0 if task not in (None, "instruct") else 1.0
        lines.append(f"distilled    from {distilled['teacher']} ({weights}; T {T:g})")
    if d["method_settings"]:
        lines.append("settings     " + ", ".join(f"{k} {v}" for k, v in d["method_settings"].items() if k != "base"))
    lines.append(f"tokens seen  {d['tokens_seen']:,}" if d["tokens_seen"] is not None else "tokens seen  unknown")
    for split, row in d["last"].items():
        lines.append(f"last {split:<7} {losses(row)}")
    best = d.get("best") or {}
    if best.get("value") is not None:
        lines.append(f"best         {best['metric']} {best['value']:.4g} at step {best['step']}")
    lines.append(f"backend      {d['backend']}")
    lines += here
    if "unused" in d:
        unused = ", ".join(d["unused"]) or "none (every checkpoint entry is used)"
        lines.append(f"unused       {unused}")
    lines += [f"saved        {', '.join(d['checkpoints'])}", "config"]
    lines += [f"  {k} = {v!r}" for k, v in flatten(d["config"]).items()]
    return "\n".join(lines)
