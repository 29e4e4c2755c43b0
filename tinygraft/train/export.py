"""`tinygraft export RUN --to DIR`: a run's kept checkpoint in the Hugging Face layout, with its tokenizer.

The kept checkpoint is the one results.json names (`best` when the run tracked a metric and kept its best step,
else `latest`). A LoRA run is exported merged (W + scale * B A) so the directory is a plain model; a fine-tuned
TaskModel exports its backbone (the task head has no GPT-2 / BERT layout and is reported as left out).
"""

from pathlib import Path

import torch

from tinygraft.core.errors import TinygraftError
from tinygraft.models import hf


def kept_pointer(run: str | Path) -> str:
    """'best' when results.json says the run kept its best checkpoint and a `best` pointer exists, else 'latest'."""
    import json

    run = Path(run)
    results = run / "results.json"
    if results.is_file() and (run / "checkpoints" / "best").is_file():
        try:
            if json.loads(results.read_text(encoding="utf-8")).get("kept") == "best":
                return "best"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return "latest"


def export_run(run: str | Path, to: str | Path, which: str | None = None, overwrite: bool = False) -> dict:
    """Write the run's checkpoint into `to`; returns what was written (for the CLI to print)."""
    from tinygraft.core.lora import lora_layers, unload_lora
    from tinygraft.train.pretrain import load_trained

    to = Path(to)
    if to.exists() and not to.is_dir():
        raise TinygraftError(f"export target '{to}' is a file, not a directory")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise TinygraftError(f"export target '{to}' is not empty; pass --overwrite to write into it anyway")
    trained = load_trained(run, torch.device("cpu"), which or kept_pointer(run))
    model, notes = trained.model, []
    if next(lora_layers(model), None) is not None:
        model = unload_lora(model, merge=True)
        notes.append("LoRA adapters merged into the base weights")
    if hasattr(model, "backbone") and hasattr(model, "head"):  # a fine-tuned TaskModel
        notes.append(f"task head {type(model.head).__name__} left out (the Hugging Face layout has no place for it)")
        model = model.backbone
    hf.save_pretrained_model(model, to, trained.tokenizer)
    return {
        "checkpoint": str(trained.ckpt.path),
        "to": str(to),
        "architecture": hf.config_to_hf(model)["architectures"][0],
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "notes": notes,
    }


def export_command(args) -> int:
    """CLI: args.run, args.to, optional args.checkpoint ('latest'|'best'|None) and args.overwrite."""
    done = export_run(args.run, args.to, getattr(args, "checkpoint", None), getattr(args, "overwrite", False))
    print(f"exported {done['checkpoint']} as {done['architecture']} ({done['params']:,} parameters) to {done['to']}")
    for note in done["notes"]:
        print(f"note: {note}")
    return 0
