"""`tinygraft embed --from PATH`: sentence embeddings of a file (or stdin), as JSONL or a .npy array.

PATH is a pretrained directory (its own pooling: all-MiniLM-L6-v2 says mean, then L2-normalise), `minilm`, or a
tinygraft run / checkpoint (mean pooling). Input: one text per line (blank lines skipped), or JSONL with a "text"
field. Output: `out.npy` (float32, N x C), `out.jsonl` (`{"text": ..., "embedding": [...]}` per line), or JSONL on
stdout when no --output is given.
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tinygraft.core.checkpoint import atomic_write
from tinygraft.core.jsonfile import jsonl_objects
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import unwrap
from tinygraft.models.pooling import Pooling
from tinygraft.train import runs


def read_texts(source: str | Path | None, text_field: str = "text") -> list[str]:
    """Lines of a file (or stdin for None / '-'); a .jsonl file gives each object's `text_field`."""
    if source is None or str(source) == "-":
        text, name, jsonl = sys.stdin.read(), "stdin", False
    else:
        path = Path(source)
        if path.is_dir():
            raise TinygraftError(f"input '{path}' is a directory; give a file of texts")
        if not path.is_file():
            raise TinygraftError(f"input file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise TinygraftError(f"input file '{path}' is not UTF-8 text") from None
        name, jsonl = str(path), path.suffix == ".jsonl"
    if not jsonl:
        texts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    else:
        texts = []
        for i, row in jsonl_objects(text, f"'{name}'"):
            if not isinstance(row.get(text_field), str):
                raise TinygraftError(f"line {i} of '{name}' has no string field {text_field!r}")
            texts.append(row[text_field])
    if not texts:
        raise TinygraftError(f"{name} holds no text to embed")
    return texts


def load_encoder(spec: str | Path, device: torch.device, adapter: str | None = None):
    """(model, tokenizer, pooling) from a pretrained directory / 'minilm' (its own pooling), or from a tinygraft run
    or checkpoint (mean pooling; a fine-tuned run embeds with its backbone, through adapter `adapter` of a
    multi-adapter run)."""
    loaded = runs.load(spec, device=device, adapter=adapter)
    model = loaded.model.backbone if loaded.kind == "finetune" else unwrap(loaded.model)
    if loaded.tokenizer is None:
        raise TinygraftError(f"'{loaded.path}' has no tokenizer to embed text with")
    return model, loaded.tokenizer, loaded.pooling or Pooling()


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Refuse a bad --output before any work is done."""
    path = Path(output)
    if path.suffix not in (".npy", ".jsonl"):
        raise TinygraftError(f"output '{path}' must end in .npy or .jsonl")
    if path.exists() and not overwrite:
        raise TinygraftError(f"output '{path}' already exists; pass --overwrite to replace it")
    return path


def write_embeddings(vectors: torch.Tensor, texts: list[str], output: str | Path | None, overwrite: bool) -> None:
    array = vectors.float().numpy()
    if output is None or str(output) == "-":
        for text, vec in zip(texts, array):
            sys.stdout.write(json.dumps({"text": text, "embedding": vec.tolist()}) + "\n")
        return
    path = check_output(output, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, array)
        atomic_write(path, buf.getvalue())
    else:
        atomic_write(
            path, "".join(json.dumps({"text": t, "embedding": v.tolist()}) + "\n" for t, v in zip(texts, array))
        )
