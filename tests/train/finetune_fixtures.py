"""Tiny pretrained directories and data files shared by the fine-tuning tests (a few seconds to build).

A 4-block BERT (32 wide) and a 2-block GPT with tokenizers trained on the stdlib docstring demo texts, saved in the
Hugging Face layout, so `--from DIR` takes the same path a real checkpoint does.
"""

import csv
import json
from pathlib import Path

import torch

from tinygraft.data.demo import build_demo_task
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.gpt import GPT, GPTConfig

BERT_LAYERS = 4


def demo_rows():
    train, val = build_demo_task()
    return train, val


def write_tsv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def make_bert_dir(root: Path, texts: list[str]) -> Path:
    torch.manual_seed(0)
    tok = TextTokenizer.train(texts, "wordpiece", 400)
    cfg = BERTConfig(
        vocab_size=tok.vocab_size,
        max_position_embeddings=64,
        n_layer=BERT_LAYERS,
        n_head=2,
        n_embd=32,
        intermediate_size=37,
    )
    path = root / "tiny-bert"
    BERT(cfg).save_pretrained(path, tok)
    return path


def make_gpt_dir(root: Path, texts: list[str]) -> Path:
    torch.manual_seed(0)
    tok = TextTokenizer.train(texts, "bpe", 400)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    path = root / "tiny-gpt"
    GPT(cfg).save_pretrained(path, tok)
    return path


def make_data(root: Path) -> dict[str, Path]:
    """Classification (the demo, 2 classes, small), sentence pairs, CoNLL tags, SQuAD-style QA, prompt/completion."""
    train, val = demo_rows()
    keep = ("logging", "asyncio")
    tr = [r for r in train if r[1] in keep][:48]
    va = [r for r in val if r[1] in keep][:24]
    d = {
        "train": write_tsv(root / "train.tsv", ["text", "label"], tr),
        "val": write_tsv(root / "val.tsv", ["text", "label"], va),
    }
    texts = [t for t, _ in tr + va]
    pairs = [(texts[i], texts[i + 1], f"{(i * 7) % 6:.1f}") for i in range(0, 40, 2)]
    d["pairs"] = write_tsv(root / "pairs.tsv", ["sentence1", "sentence2", "score"], pairs)
    words = [t.split()[:8] for t in texts[:24]]
    conll = "\n\n".join(
        "\n".join(
            f"{w} {'B-LOG' if w.lower().startswith('log') else ('I-LOG' if j and w == 'the' else 'O')}"
            for j, w in enumerate(ws)
        )
        for ws in words
    )
    (root / "tags.conll").write_text(conll + "\n", encoding="utf-8")
    d["tags"] = root / "tags.conll"
    articles = []
    for a in range(6):
        paras = []
        for t in texts[a * 4 : a * 4 + 4]:
            ws = t.split()
            ans = " ".join(ws[1:3])
            qa = {
                "id": f"{a}-{len(paras)}",
                "question": f"what follows {ws[0]}?",
                "answers": [{"text": ans, "answer_start": t.index(ans)}],
            }
            paras.append({"context": t, "qas": [qa]})
        articles.append({"title": f"article {a}", "paragraphs": paras})
    (root / "squad.json").write_text(json.dumps({"data": articles}), encoding="utf-8")
    d["squad"] = root / "squad.json"
    prompts = [{"prompt": f"Which package? {t}\nAnswer:", "completion": f" {y}"} for t, y in tr[:24]]
    (root / "instruct.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    d["instruct"] = root / "instruct.jsonl"
    return d


def make_env(root: Path) -> dict:
    """Tiny BERT and GPT directories pre-trained on the demo's texts, and the train / val files (make_data)."""
    data = make_data(root)
    texts = [ln.split("\t")[0] for ln in data["train"].read_text().splitlines()[1:]]
    return {"root": root, "bert": make_bert_dir(root, texts * 3), "gpt": make_gpt_dir(root, texts * 3), **data}
