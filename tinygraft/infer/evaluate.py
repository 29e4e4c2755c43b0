"""`tinygraft eval`: validation loss and perplexity of a language model on a corpus.

With no corpus, a pre-training run's own validation split (the same tokens pre-training evaluated on); with
`--data`, every token of that corpus, read with the model's tokenizer (a GPT-2 or masked-LM BERT directory works
too).
"""

import torch

from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.errors import TinygraftError
from tinygraft.models.pretrained import is_language_model
from tinygraft.tasks.lm import objective_for
from tinygraft.train import runs
from tinygraft.train.config import DataConfig, TrainConfig
from tinygraft.train.loop import resolve_device


def evaluate(
    path: str,
    data: str | None = None,
    max_batches: int | None = None,
    device: str = "auto",
    which: str | None = "latest",
) -> dict:
    if max_batches is not None and max_batches < 1:
        raise TinygraftError(f"--batches must be at least 1, got {max_batches}")
    dev = resolve_device(device)
    loaded = runs.load(path, which, device=dev, target="lm")
    if loaded.kind == "finetune" or not is_language_model(loaded.model):
        raise TinygraftError(
            f"eval scores a language model (a pre-training run, a GPT-2 or masked-LM BERT directory); "
            f"'{loaded.path}' holds a {'fine-tuned task model' if loaded.kind == 'finetune' else 'BERT encoder'}"
        )
    run = loaded.run
    d, t = (run.data, run.train) if run is not None else (DataConfig(), TrainConfig())
    if data is None:
        if run is None:
            raise TinygraftError(f"'{loaded.path}' is not a run, so it has no validation split; give --data CORPUS")
        corpus = runs.in_run(runs.run_dir_of(loaded.ckpt.path), d.corpus)
        cache = TokenCache.build(read_corpus(corpus, d.text_field), loaded.tokenizer, val_fraction=d.val_fraction)
        trained_on = loaded.ckpt.trainer_state.get("token_cache")
        if trained_on is not None and trained_on != cache.key:
            raise TinygraftError(
                f"the corpus {d.corpus or 'pydoc_data.topics'!r} is not the text the run was trained on any more (it "
                "changed or moved), so its split is not the run's validation split; score it as it is with --data"
            )
        tokens, source = cache.val, "the run's validation split"
    else:
        cache = TokenCache.build(read_corpus(data, d.text_field), loaded.tokenizer, val_fraction=0.0)
        tokens, source = cache.tokens, repr(data)
    cfg = loaded.model.config
    positions = getattr(cfg, "block_size", None) or cfg.max_position_embeddings
    seq_len = min(t.seq_len, positions, len(tokens) - 1)
    family = "gpt" if hasattr(cfg, "block_size") else "bert"
    least = 1 if family == "gpt" else 3  # a masked-LM window holds [CLS] and [SEP] beside its text
    if seq_len < least:
        raise TinygraftError(
            f"{source} holds {len(tokens)} tokens, too few to score (at least {least + 1}); give a longer corpus"
        )
    batches = max_batches or max(1, (len(tokens) - 1) // (seq_len * t.batch_size) + 1)
    fn = objective_for(family).evaluator(tokens, loaded.tokenizer, t.batch_size, seq_len, batches, d.mask_prob, dev)
    with torch.no_grad():
        metrics = fn(loaded.model)
    step = loaded.ckpt.step if loaded.ckpt is not None else None
    where = str(loaded.ckpt.path) if loaded.ckpt is not None else str(loaded.path)
    return {**metrics, "tokens": int(len(tokens)), "source": source, "step": step, "checkpoint": where}
