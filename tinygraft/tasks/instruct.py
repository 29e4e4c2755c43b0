"""`--task instruct`: instruction tuning of a GPT on prompt / completion pairs.

data     a table (JSONL usually) with a prompt and a completion column
head     the GPT's own tied LM head: nothing new is trained on top
loss     next-token CE on the completion only: labels are the ids with every prompt and padding position -100
         (data/labeled.py builds them); logits at t predict labels at t + 1, as in `transformers`
metric   perplexity of the completions (lower is better)
predict  {"prompt", "completion"}, greedy decoding; input: a table with the run's prompt column, or a prompt per
         line
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import Features
from tinygraft.tasks import metrics
from tinygraft.tasks.base import Scorer, Task


class PromptCompletionHead(nn.Module):
    """Next-token CE on the completion, through the GPT's own LM head."""

    pair_inputs = False
    num_labels = 0
    family = "gpt"

    def forward(self, features: Features, batch: dict):
        if features.lm_head is None:
            raise TinygraftError("prompt-completion training needs a GPT backbone (it reuses its language-model head)")
        logits = features.lm_head(features.hidden)  # (B, T, V)
        labels = batch.get("labels")
        if labels is None:
            return {"logits": logits}, None
        target = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100)
        return {"logits": logits, "n_targets": (target != -100).sum()}, loss


class PerplexityScorer(Scorer):
    collected = ()

    def metrics(self):
        return {"perplexity": metrics.perplexity(self.loss_sum / self.loss_weight)} if self.loss_weight else {}


class Instruct(Task):
    name = "instruct"
    summary = "prompt -> completion instruction tuning of a GPT (loss on the completion only)"
    columns = ("prompt", "completion", None)
    family = "gpt"

    def read(self, path, data, settings, labeled=True):
        text, pair, _ = self.column_names(data)
        return L.read_labeled(path, text, None, pair if labeled else None, quote_none=data.quote_none)

    def encode(self, examples, tokenizer, data, settings, label_map, source):
        return L.encode_prompt_completions(examples, tokenizer, data.max_length)

    def make_head(self, backbone, settings, label_map, pooling):
        return PromptCompletionHead()

    def loss_count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def metric(self, settings):
        return "perplexity", False

    def scorer(self, settings, label_map, examples, features):
        return PerplexityScorer()

    @torch.no_grad()
    def predict(self, model, tokenizer, examples, data, settings, label_map, batch_size, max_new_tokens):
        device = next(model.parameters()).device
        gpt, rows = model.backbone, []
        for ex in examples:
            ids = tokenizer.encode(ex.text)[-data.max_length :] or [tokenizer.eos_id]
            out = gpt.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.0)[0, len(ids) :]
            out = out.tolist()
            if tokenizer.eos_id in out:
                out = out[: out.index(tokenizer.eos_id)]
            rows.append({"prompt": ex.text, "completion": tokenizer.decode(out)})
        return rows
