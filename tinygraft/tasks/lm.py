"""The pre-training objectives: a causal language model for GPTs, a masked language model for BERTs.

    causal-lm   predict token t + 1 from tokens <= t; every position is a target
    mlm         predict the 15% of tokens the batcher chose (80% [MASK], 10% random, 10% kept), from both sides

Each gives `tinygraft pretrain` (train/pretrain.py) its batcher, its loss, its token count (for tokens/s) and its
validation metrics (loss and perplexity); `tinygraft eval` scores a checkpoint with the same evaluation. Nothing
else in the job differs between the two. An objective's loss is the mean over its targets; a job may add further
loss terms beside it (train/loop.py: `Job.loss_terms`, the hook distillation uses).
"""

import math

import numpy as np

from tinygraft.core import dist
from tinygraft.data.batching import CausalLMBatcher, MLMBatcher, eval_batches
from tinygraft.errors import TinygraftError


class CausalLM:
    name = "causal-lm"

    def batcher(self, tokens: np.ndarray, batch_size: int, seq_len: int, tokenizer, seed: int, mask_prob: float):
        return CausalLMBatcher(tokens, batch_size, seq_len, seed=seed)

    @staticmethod
    def loss(model, batch):
        x, y = batch
        return model(x, y)[1]

    @staticmethod
    def count_tokens(batch) -> int:
        return batch[0].numel()

    @staticmethod
    def loss_count(batch) -> int:
        """What the loss is the mean over: the targets (train/parallel.py weighs each process's share by it)."""
        return int((batch[1] != -100).sum())

    def evaluator(self, val: np.ndarray, tokenizer, batch_size: int, seq_len: int, max_batches: int, mask_prob, device):
        def evaluate(model) -> dict:
            total, count = 0.0, 0
            for x, y in dist.mine(eval_batches(val, batch_size, seq_len, max_batches)):  # several processes: a share
                loss = model(x.to(device), y.to(device))[1]
                total, count = total + float(loss) * y.numel(), count + y.numel()
            total, count = dist.eval_sum([total, count])
            loss = total / count
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

        return evaluate


class MaskedLM:
    name = "mlm"

    def batcher(self, tokens, batch_size, seq_len, tokenizer, seed, mask_prob):
        return MLMBatcher(tokens, batch_size, seq_len, tokenizer, seed=seed, mask_prob=mask_prob)

    @staticmethod
    def loss(model, batch):
        return model(**batch)[1]

    @staticmethod
    def count_tokens(batch) -> int:
        return int(batch["attention_mask"].sum())

    @staticmethod
    def loss_count(batch) -> int:
        return int((batch["labels"] != -100).sum())

    def evaluator(self, val, tokenizer, batch_size, seq_len, max_batches, mask_prob, device):
        def evaluate(model) -> dict:
            # A fresh batcher with a fixed seed each time: every evaluation scores the same masked positions.
            batcher = MLMBatcher(val, batch_size, seq_len, tokenizer, seed=0, mask_prob=mask_prob)
            total, count = 0.0, 0
            drawn = [batcher.next() for _ in range(max_batches)]  # every rank draws them all: the masks are a sequence
            for batch in dist.mine(drawn):
                batch = {k: v.to(device) for k, v in batch.items()}
                n = int((batch["labels"] != -100).sum())
                if n:
                    total, count = total + float(model(**batch)[1]) * n, count + n
            total, count = dist.eval_sum([total, count])
            loss = total / max(count, 1)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

        return evaluate


OBJECTIVES = {"gpt": CausalLM(), "bert": MaskedLM()}


def objective_for(family: str):
    if family not in OBJECTIVES:
        raise TinygraftError(f"no pre-training objective for a {family!r} model (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[family]


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the tokens' own frequency distribution: the loss of the best context-free predictor."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())
