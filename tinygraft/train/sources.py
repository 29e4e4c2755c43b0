"""`--from PATH` of the training commands: the weights and tokenizer a run starts from.

PATH is a Hugging Face model directory (config.json naming a model_type + model.safetensors + tokenizer files),
`minilm` (the bundled all-MiniLM-L6-v2), or a tinygraft run / its checkpoints/ directory / one step directory.
Pre-training needs a GPT (causal LM) or a BERT with its masked-LM head; a BERT without one (MiniLM, any
`BertModel` directory) gets a freshly initialised head only when the user asks (`--new-head`). A LoRA run as a
source comes back with its adapter merged, so continued training starts from the weights it ended with.

    source = load_source("minilm", new_head=True)   # -> Source(path, kind="huggingface", model, tokenizer, ...)
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError


@dataclass
class Source:
    path: Path  # absolute
    kind: str  # "huggingface" | "run"
    model: nn.Module  # GPT or BERTForMaskedLM, without adapters, on the CPU
    tokenizer: object  # TextTokenizer
    new_heads: list[str] = field(default_factory=list)  # heads initialised fresh (not in the source's file)
    notes: list[str] = field(default_factory=list)

    @property
    def base_file(self) -> Path | None:
        """The directory a LoRA run can read its frozen base from again, byte for byte (None: it cannot)."""
        return self.path if self.kind == "huggingface" and not self.new_heads else None


def resolve_source(spec: str) -> Path:
    """The absolute path `--from spec` names ('minilm' -> the bundled checkpoint); refused when it does not exist."""
    from tinygraft.models.pretrained import resolve_pretrained

    path = resolve_pretrained(spec)
    if not path.exists():
        raise TinygraftError(
            f"--from {spec!r} does not exist; give a Hugging Face model directory, a tinygraft run or checkpoint, "
            "or 'minilm'"
        )
    return path.resolve()


def looks_like_run(path: Path) -> bool:
    """A run directory, its checkpoints/ directory, or one step directory (what checkpoint.resolve accepts)."""
    return (
        (path / "checkpoints").is_dir()
        or (path / "latest").is_file()
        or (path / checkpoint.TRAINER_STATE).is_file()
        or bool(checkpoint.STEP_DIR.match(path.name))
    )


def load_source(spec: str, new_head: bool = False) -> Source:
    from tinygraft.models import hf

    path = resolve_source(spec)
    if not path.is_dir():
        raise TinygraftError(f"--from '{path}' is a file; give a directory (a pretrained model or a tinygraft run)")
    if hf.is_hf_dir(path):
        return _from_huggingface(path, new_head)
    if looks_like_run(path):
        return from_run(path)
    raise TinygraftError(
        f"--from '{path}' is neither a tinygraft run or checkpoint nor a Hugging Face model directory "
        "(config.json naming a model_type, with model.safetensors)"
    )


def _from_huggingface(path: Path, new_head: bool) -> Source:
    from tinygraft.models import hf
    from tinygraft.models.gpt import GPTConfig
    from tinygraft.models.pretrained import load_pretrained

    cfg, _, _, _, heads = hf.inspect_dir(path)  # config.json and weight headers only
    is_gpt = isinstance(cfg, GPTConfig)
    notes = []
    if not is_gpt and not heads["mlm"] and not new_head:
        raise TinygraftError(
            f"--from '{path}' is a BERT without a masked-LM head (cls.predictions.*), which masked-LM pre-training "
            "trains; add --new-head to start one from a fresh initialisation"
        )
    if new_head and (is_gpt or heads["mlm"]):
        notes.append(f"--new-head has no effect: '{path}' has its {'LM' if is_gpt else 'masked-LM'} head")
    pre = load_pretrained(path, "gpt" if is_gpt else "mlm", new_head=new_head and not is_gpt)
    if pre.report.new_heads:
        notes.append(f"new {', '.join(pre.report.new_heads)} initialised fresh (not in '{path}')")
    return Source(path, "huggingface", pre.model, pre.tokenizer, list(pre.report.new_heads), notes)


def from_run(path: Path) -> Source:
    from tinygraft.peft.lora import lora_layers, unload_lora
    from tinygraft.train.pretrain import load_trained

    config = checkpoint.load(path, with_optimizer=False).config
    if config.get("kind") == "finetune":
        raise TinygraftError(
            f"--from '{path}' is a fine-tuning run; export its backbone (`tinygraft export RUN --to DIR`) and start "
            "from that directory (with --new-head for a BERT)"
        )
    trained = load_trained(path, torch.device("cpu"))
    model, notes = trained.model, []
    if next(lora_layers(model), None) is not None:
        model = unload_lora(model, merge=True)
        notes.append("the LoRA run's adapter is merged into its base weights")
    model.requires_grad_(True)
    return Source(path, "run", model.train(), trained.tokenizer, [], notes)
