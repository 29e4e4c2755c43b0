"""`tinygraft export RUN --to DIR`: a run's kept checkpoint in the Hugging Face layout, with its tokenizer.

The kept checkpoint is the one results.json names (`best` when the run tracked a metric and kept its best step,
else `latest`). A LoRA run is exported merged (W + scale * B A) so the directory is a plain model (`--merged`
says so explicitly); `--adapter DIR` writes its adapter in peft's layout instead (adapter_config.json +
adapter_model.safetensors, for `peft.PeftModel.from_pretrained(base, DIR)`). A LoRA checkpoint holds only the
adapter: the base is read from the path its base.json records, and refused if its weights' sha256 changed. A
fine-tuned TaskModel exports its backbone (the task head has no GPT-2 / BERT layout and is reported as left out).
"""

from pathlib import Path

import torch

from tinygraft.errors import TinygraftError
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


def _check_target(to: Path, overwrite: bool) -> None:
    if to.exists() and not to.is_dir():
        raise TinygraftError(f"export target '{to}' is a file, not a directory")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise TinygraftError(f"export target '{to}' is not empty; pass --overwrite to write into it anyway")


def is_finetune_checkpoint(step_dir: Path) -> bool:
    """A fine-tuning run's checkpoint (its config.json names the task)."""
    import json

    try:
        return json.loads((step_dir / "config.json").read_text(encoding="utf-8")).get("kind") == "finetune"
    except (OSError, ValueError):
        return False  # the loaders that follow report an unreadable checkpoint in one sentence


def is_lora_checkpoint(step_dir: Path) -> bool:
    from tinygraft.train.lora_method import BASE_FILE

    return (step_dir / BASE_FILE).is_file()


def _lora_trained(run: str | Path, which: str):
    """(model with its adapter attached, tokenizer or None, checkpoint, notes) of a LoRA run's checkpoint."""
    from tinygraft.core import checkpoint
    from tinygraft.data.tokenizer import TextTokenizer
    from tinygraft.train.lora_method import load_lora_model, read_base_record

    ckpt = checkpoint.load(run, which, with_optimizer=False)
    model, notes = load_lora_model(ckpt.path, ckpt.model, ckpt.config)
    base = read_base_record(ckpt.path)["path"]
    if ckpt.tokenizer_path is not None:
        tokenizer = TextTokenizer.load(ckpt.tokenizer_path)
    elif base is not None and hf.has_tokenizer(base):
        tokenizer = hf.load_tokenizer(base, model.config)
    else:
        tokenizer = None
    return model.eval(), tokenizer, ckpt, notes


def export_run(run: str | Path, to: str | Path, which: str | None = None, overwrite: bool = False,
               merged: bool = False) -> dict:  # fmt: skip
    """Write the run's checkpoint into `to`; returns what was written (for the CLI to print). `merged=True` insists
    the run is a LoRA run (whose adapter is merged into the base either way)."""
    from tinygraft.core import checkpoint
    from tinygraft.peft.lora import lora_layers, unload_lora
    from tinygraft.train.pretrain import load_trained

    to = Path(to)
    _check_target(to, overwrite)
    which = which or kept_pointer(run)
    step_dir = checkpoint.resolve(run, which)
    if is_finetune_checkpoint(step_dir):  # a TaskModel, LoRA or not: the fine-tuning loader rebuilds it
        from tinygraft.train.predict import load_finetuned

        ft = load_finetuned(run, torch.device("cpu"), which)
        model, tokenizer, ckpt, notes = ft.model, ft.tokenizer, ft.ckpt, []
    elif is_lora_checkpoint(step_dir):
        model, tokenizer, ckpt, notes = _lora_trained(run, which)
    elif merged:
        raise TinygraftError(f"{str(run)!r} is not a LoRA run, so there is no adapter to merge; export it "
                             "without --merged")  # fmt: skip
    else:
        trained = load_trained(run, torch.device("cpu"), which)
        model, tokenizer, ckpt, notes = trained.model, trained.tokenizer, trained.ckpt, []
    if next(lora_layers(model), None) is not None:
        model = unload_lora(model, merge=True)
        notes.append("LoRA adapters merged into the base weights")
    if hasattr(model, "backbone") and hasattr(model, "head"):  # a fine-tuned TaskModel
        notes.append(f"task head {type(model.head).__name__} left out (the Hugging Face layout has no place for it)")
        model = model.backbone
    hf.save_pretrained_model(model, to, tokenizer)
    return {
        "checkpoint": str(ckpt.path),
        "to": str(to),
        "architecture": hf.config_to_hf(model)["architectures"][0],
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "notes": notes,
    }


def export_adapter(run: str | Path, to: str | Path, which: str | None = None, overwrite: bool = False) -> dict:
    """Write a LoRA run's adapter into `to` in peft's layout, keyed for the Hugging Face model of its base."""
    import json

    from tinygraft.core import checkpoint
    from tinygraft.models.gpt import GPT
    from tinygraft.peft.files import CONFIG_NAME, save_adapter
    from tinygraft.train.lora_method import read_base_record

    to = Path(to)
    _check_target(to, overwrite)
    which = which or kept_pointer(run)
    if not is_lora_checkpoint(checkpoint.resolve(run, which)):
        raise TinygraftError(f"{str(run)!r} is not a LoRA run, so it has no adapter to export; export the model "
                             "with --to DIR")  # fmt: skip
    model, _, ckpt, notes = _lora_trained(run, which)
    base = read_base_record(ckpt.path)["path"]
    save_adapter(model, to, base_model_name_or_path=base)
    if isinstance(model, GPT):  # the Hugging Face GPT-2 stores these layers as Conv1D, weight (in, out)
        config = json.loads((to / CONFIG_NAME).read_text(encoding="utf-8"))
        config["fan_in_fan_out"] = True
        (to / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if base is None:
        notes.append("the base was built from a preset, not read from a file: export it with --to DIR too, and "
                     "load the adapter onto that")  # fmt: skip
    return {"checkpoint": str(ckpt.path), "to": str(to), "base": base, "notes": notes,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def export_command(args) -> int:
    """CLI: args.run, args.to and/or args.adapter, optional args.checkpoint ('latest'|'best'|None), args.merged
    and args.overwrite."""
    which, overwrite = getattr(args, "checkpoint", None), getattr(args, "overwrite", False)
    to, adapter = getattr(args, "to", None), getattr(args, "adapter", None)
    if to is None and adapter is None:
        raise TinygraftError("export needs --to DIR (the model, LoRA merged) or --adapter DIR (a LoRA run's adapter)")
    if to is not None:
        done = export_run(args.run, to, which, overwrite, merged=getattr(args, "merged", False))
        print(f"exported {done['checkpoint']} as {done['architecture']} ({done['params']:,} parameters) to "
              f"{done['to']}")
        for note in done["notes"]:
            print(f"note: {note}")
    if adapter is not None:
        done = export_adapter(args.run, adapter, which, overwrite)
        print(f"exported the LoRA adapter of {done['checkpoint']} ({done['params']:,} parameters, base "
              f"{done['base']}) to {done['to']} in peft's layout")  # fmt: skip
        for note in done["notes"]:
            print(f"note: {note}")
    return 0
