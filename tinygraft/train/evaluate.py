"""`tinygraft eval`: validation loss and perplexity of a checkpoint on a corpus.

With no corpus, the run's own validation split (the same tokens pre-training evaluated on); with `--data`, every
token of that corpus, read with the checkpoint's tokenizer.
"""

import torch

from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.models.presets import family
from tinygraft.train.loop import resolve_device
from tinygraft.train.pretrain import causal_lm_eval, load_trained, mlm_eval, positions


def evaluate(path: str, data: str | None = None, max_batches: int | None = None, device: str = "auto",
             which: str = "latest") -> dict:
    dev = resolve_device(device)
    trained = load_trained(path, dev, which)
    run, t = trained.run, trained.run.train
    if data is None:
        cache = TokenCache.build(read_corpus(run.data.corpus, run.data.text_field), trained.tokenizer,
                                 val_fraction=run.data.val_fraction)
        tokens, source = cache.val, "the run's validation split"
    else:
        cache = TokenCache.build(read_corpus(data, run.data.text_field), trained.tokenizer, val_fraction=0.0)
        tokens, source = cache.tokens, repr(data)
    seq_len = min(t.seq_len, positions(trained.model_cfg), len(tokens) - 1)
    batches = max_batches or max(1, (len(tokens) - 1) // (seq_len * t.batch_size) + 1)
    if family(trained.model_cfg) == "gpt":
        fn = causal_lm_eval(tokens, t.batch_size, seq_len, batches, dev)
    else:
        fn = mlm_eval(tokens, trained.tokenizer, t.batch_size, seq_len, batches, run.data.mask_prob, dev)
    with torch.no_grad():
        metrics = fn(trained.model)
    return {**metrics, "tokens": int(len(tokens)), "source": source, "step": trained.ckpt.step,
            "checkpoint": str(trained.ckpt.path)}
