"""`tinygraft sample`: text from a GPT (temperature, top-k, top-p, seed, KV cache): a pre-training run, a GPT-2
directory, or a run fine-tuned from one."""

import math
import sys

import torch

from tinygraft.errors import TinygraftError
from tinygraft.models.gpt import GPT
from tinygraft.train import runs
from tinygraft.train.loop import resolve_device


def sample(
    path: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    use_cache: bool = True,
    device: str = "auto",
    which: str | None = "latest",
    adapter: str | None = None,
) -> list[str]:
    if max_new_tokens < 1 or num_samples < 1:
        raise TinygraftError("--tokens and --num-samples must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise TinygraftError(f"--temperature must be a number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise TinygraftError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise TinygraftError(f"--top-p must be in (0, 1], got {top_p}")
    dev = resolve_device(device)
    loaded = runs.load(path, which, device=dev, adapter=adapter)
    model = loaded.model.backbone if loaded.kind == "finetune" else loaded.model
    if not isinstance(model, GPT):
        where = str(loaded.ckpt.path) if loaded.ckpt is not None else str(loaded.path)
        raise TinygraftError(
            f"sample needs a GPT checkpoint; {where!r} holds a BERT model, try `tinygraft eval` instead"
        )
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        where = str(loaded.ckpt.path) if loaded.ckpt is not None else str(loaded.path)
        raise TinygraftError(
            f"{len(bad)} weight tensors of {where!r} hold NaN or infinity (first: {bad[0]}): the run diverged "
            "before this checkpoint; sample an earlier step directory instead"
        )
    tok = loaded.tokenizer
    if tok is None:
        raise TinygraftError(f"'{loaded.path}' has no tokenizer to turn the samples into text")
    ids = tok.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts a new document
        if tok.eos_id is None:
            raise TinygraftError("give a --prompt: this tokenizer has no end-of-text token to start from")
        ids = [tok.eos_id]
    if len(ids) >= model.config.block_size:
        keep = model.config.block_size - 1
        print(f"note: the prompt's {len(ids)} tokens do not fit the model's {model.config.block_size} positions; "
              f"sampling goes on from its last {keep}", file=sys.stderr)  # fmt: skip
        ids = ids[-keep:]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache=use_cache)
    # The prompt as typed, then the new tokens (an empty prompt's start token is not shown).
    return [prompt + tok.decode(row[idx.shape[1] :].tolist()) for row in out.cpu()]
