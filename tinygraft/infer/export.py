"""`tinygraft export RUN --to DIR`: a run's kept checkpoint in the Hugging Face layout, with its tokenizer.

The kept checkpoint is the one results.json names (`best` when the run tracked a metric and kept its best step,
else `latest`). An adapter run is exported merged (W + scale * B A) so the directory is a plain model (`--merged`
says so explicitly); `--adapter DIR` writes its adapter in peft's layout instead (adapter_config.json +
adapter_model.safetensors, for `peft.PeftModel.from_pretrained(base, DIR)`). An adapter checkpoint holds only the
adapter: the base is read again from where its base.json says, and refused if its weights' sha256 changed. A
fine-tuned TaskModel exports its backbone (the task head has no GPT-2 / BERT layout and is reported as left out);
its adapter carries the head too where peft + transformers have a task model computing it (a BERT classifier that
pools with the pooler, a BERT tagger or reader: `PeftModel.from_pretrained(BertForSequenceClassification...)`).
"""

import json
from pathlib import Path

import torch

from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERT
from tinygraft.models.gpt import GPT
from tinygraft.models.hf import CONFIG, MAX_SHARD_SIZE, parse_size
from tinygraft.peft.adapters import DEFAULT_ADAPTER, adapter_layers, unload
from tinygraft.peft.files import CONFIG_NAME, save_adapter
from tinygraft.peft.prompt import PrefixConfig, prompt_settings, virtual_layers
from tinygraft.tasks import get_task
from tinygraft.train import runs
from tinygraft.train.methods.adapter import AdapterMethod, is_adapter_checkpoint


def _check_target(to: Path, overwrite: bool) -> None:
    if to.exists() and not to.is_dir():
        raise TinygraftError(f"export target '{to}' is a file, not a directory")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise TinygraftError(f"export target '{to}' is not empty; pass --overwrite to write into it anyway")


def _step_dir(run: str | Path, which: str | None) -> Path:
    kind, _, step_dir = runs.locate_spec(run, which)
    if kind == "huggingface":
        raise TinygraftError(f"'{run}' is a Hugging Face directory already; export writes a tinygraft run's model")
    return step_dir


def _check_not_source(run: str | Path, which: str | None, to: Path) -> None:
    """Writing into the run's own files would destroy what is being exported (or the run around it)."""
    step_dir = _step_dir(run, which).resolve()
    target, run_dir = to.resolve(), runs.run_dir_of(step_dir)
    if target.is_relative_to(step_dir) or (
        run_dir is not None and (target == run_dir or target.is_relative_to(run_dir / "checkpoints"))
    ):
        raise TinygraftError(
            f"export target '{to}' is part of the run being exported ({step_dir}); choose a directory outside it"
        )


def _run(run: str | Path, which: str | None, adapter: str | None = None) -> runs.Loaded:
    return runs.load(run, which, device=torch.device("cpu"), adapter=adapter)


def export_run(
    run: str | Path,
    to: str | Path,
    which: str | None = None,
    overwrite: bool = False,
    merged: bool = False,
    adapter_name: str | None = None,
    max_shard_size: int | str | None = None,
) -> dict:
    """Write the run's checkpoint into `to`; returns what was written (for the CLI to print). `merged=True` insists
    the run is an adapter run (whose adapter is merged into the base either way); weights over `max_shard_size`
    (transformers' default, 50GB, when None) are written as shards with their index."""
    to = Path(to)
    parse_size(MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)  # a bad size before any work
    _check_target(to, overwrite)
    _check_not_source(run, which, to)
    if merged and not is_adapter_checkpoint(_step_dir(run, which)):
        raise TinygraftError(
            f"{str(run)!r} is not an adapter run, so there is no adapter to merge; export it without --merged"
        )
    loaded = _run(run, which, adapter_name)
    model, notes = loaded.model, list(loaded.notes)
    adapted = next(adapter_layers(model), None) is not None
    if adapted:
        model = unload(model, merge=True)
        notes.append(f"{loaded.method.label} adapters merged into the base weights")
    if loaded.kind == "finetune":
        notes.append(f"task head {type(model.head).__name__} left out (the Hugging Face layout has no place for it)")
        model = model.backbone
    model.save_pretrained(to, loaded.tokenizer, max_shard_size)
    architecture = json.loads((to / CONFIG).read_text(encoding="utf-8"))["architectures"][0]
    return {
        "checkpoint": str(loaded.ckpt.path),
        "to": str(to),
        "architecture": architecture,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "notes": notes,
    }


def export_adapter(
    run: str | Path, to: str | Path, which: str | None = None, overwrite: bool = False, adapter_name: str | None = None
) -> dict:
    """Write an adapter run's adapter into `to` in peft's layout, keyed for the Hugging Face model of its base."""
    to = Path(to)
    _check_target(to, overwrite)
    _check_not_source(run, which, to)
    if not is_adapter_checkpoint(_step_dir(run, which)):
        raise TinygraftError(
            f"{str(run)!r} is not an adapter run, so it has no adapter to export; export the model with --to DIR"
        )
    loaded = _run(run, which, adapter_name)
    if not isinstance(loaded.method, AdapterMethod) or next(adapter_layers(loaded.model), None) is None:
        raise TinygraftError(
            f"{str(run)!r} is not an adapter run, so it has no adapter to export; export the model with --to DIR"
        )
    model, notes, head = loaded.model, list(loaded.notes), None
    root = model.backbone if loaded.kind == "finetune" else model
    kind = getattr(root.config, "hf_model_type", "bert")  # a RoBERTa's encoder keeps BERT's module names
    if kind == "distilbert" or (kind != "bert" and not isinstance(root, BERT)):
        raise TinygraftError(
            f"{str(run)!r} adapts a {kind} model, whose module names in transformers differ from the BERT names its "
            "adapter is keyed by; export the merged model with --to DIR instead"
        )
    prompt = next(virtual_layers(root), None)
    if prompt is not None:
        _, config, _ = prompt_settings(root)
        if getattr(config, "prefix_positions", "after") == "none":
            raise TinygraftError(
                f"{str(run)!r} trained its prefix with --prefix-positions none, which peft cannot compute (it numbers "
                "the real tokens after the prefix); train with --prefix-positions after to export it for peft"
            )
    if loaded.kind == "finetune":
        task = get_task(loaded.finetune.task)
        head = task.peft_head(model.head) if isinstance(model.backbone, BERT) and kind == "bert" else None
        if head is not None and prompt is not None and not isinstance(config, PrefixConfig):
            head = None  # peft's task models pool the first virtual token, ours the real [CLS]
            notes.append(f"task head {type(model.head).__name__} left out: peft's task models read a prompt's first "
                         "virtual token where ours read the real text")  # fmt: skip
        elif head is None and kind != "bert":
            notes.append(f"task head {type(model.head).__name__} left out: peft's {kind} task models name it otherwise")
        elif head is None:
            notes.append(
                f"task head {type(model.head).__name__} left out: no task model of peft + transformers computes it "
                "(a BERT classifier exports its head when it pools with --pooling pooler)"
            )
        else:
            notes.append(f"task head {type(model.head).__name__} exported for peft's task_type {head.task_type}")
        model = model.backbone
    base = loaded.method.base
    save_adapter(model, to, adapter_name=loaded.adapter or DEFAULT_ADAPTER, base_model_name_or_path=base, head=head)
    written = json.loads((to / CONFIG_NAME).read_text(encoding="utf-8"))
    if isinstance(model, GPT) and "fan_in_fan_out" in written:  # transformers' GPT-2 keeps these layers as Conv1D
        written["fan_in_fan_out"] = True
        (to / CONFIG_NAME).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    if base is None:
        notes.append(
            "the base was built from a preset, not read from a file: export it with --to DIR too, and "
            "load the adapter onto that"
        )
    return {
        "method": loaded.method.label,
        "checkpoint": str(loaded.ckpt.path),
        "to": str(to),
        "base": base,
        "notes": notes,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
