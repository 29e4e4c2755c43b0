"""`tinygraft predict RUN`: a fine-tuned run's predictions on a file or stdin, one JSON object per input.

    classify     {"text", "label", "probabilities": {label: p}}   (multi-label: "labels"; regression: "score")
    tokens       {"words", "tags"}                                  input: whitespace-separated words per line,
                                                                    JSONL token lists, or CoNLL columns
    qa           {"question", "answer"}                             input: question<TAB>context per line, or a
                                                                    file with the run's question/context columns
    similarity   {"text", "text_pair", "score"}  (cosine)           input: sentence<TAB>sentence per line
    instruct     {"prompt", "completion"}  (greedy decoding)

Input: `--input FILE` (TSV / CSV / JSONL with the run's column names; `.txt` or stdin: one example per line, the
two fields of a pair separated by a tab). The model is rebuilt from the checkpoint alone (architecture, head,
label map and tokenizer are in it); a LoRA run also loads its base from the path it records.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tinygraft.core import checkpoint
from tinygraft.data import labeled as L
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models.heads import TaskModel, make_head

TABLES = (".tsv", ".csv", ".jsonl", ".json")


@dataclass
class Finetuned:
    model: TaskModel
    tokenizer: TextTokenizer
    config: dict
    label_map: L.LabelMap | None
    ckpt: checkpoint.Checkpoint


def build_backbone(spec: dict) -> torch.nn.Module:
    from tinygraft.core.config import from_dict
    from tinygraft.models.bert import BERT, BERTConfig
    from tinygraft.models.gpt import GPT, GPTConfig

    if spec["family"] == "gpt":
        return GPT(from_dict(GPTConfig, spec["config"], "backbone"))
    return BERT(from_dict(BERTConfig, spec["config"], "backbone"), add_pooler=spec.get("pooler", True))


def load_finetuned(path: str | Path, device: torch.device, which: str | None = None) -> Finetuned:
    """A fine-tuned run (its kept checkpoint unless `which` names 'latest' / 'best') as a TaskModel in eval mode."""
    from tinygraft.train.export import kept_pointer
    from tinygraft.train.finetune import FinetuneArgs, load_base, method_settings
    from tinygraft.train.finetune_methods import canonical, make_method

    path = Path(path)
    ckpt = checkpoint.load(path, which or kept_pointer(path), with_optimizer=False)
    cfg = ckpt.config
    if cfg.get("kind") != "finetune":
        raise TinygraftError(f"'{path}' is not a fine-tuned run (its config has no fine-tuning task)")
    if ckpt.tokenizer_path is None:
        raise TinygraftError(f"checkpoint {str(ckpt.path)!r} is incomplete: tokenizer.json is missing")
    args = FinetuneArgs(out="", **cfg["finetune"])
    if canonical(cfg["method"])[0] == "lora":  # the checkpoint holds the adapter only: start from the base
        from tinygraft.train.lora_method import LoRAMethod

        method = LoRAMethod.from_checkpoint(ckpt.path)  # attach() refuses a base whose weights changed
        backbone = load_base(method.base_path or cfg["base"]).backbone
    else:
        method = make_method(cfg["method"], **method_settings(args, 1))
        backbone = build_backbone(cfg["backbone"])
    head_desc = dict(cfg["head"])
    model = TaskModel(backbone, make_head(head_desc.pop("task"), backbone, **head_desc))
    model = method.attach(model)
    method.load_state_dict(model, ckpt.model)
    label_map = L.LabelMap.from_dict(cfg["labels"]) if cfg.get("labels") else None
    return Finetuned(model.to(device).eval(), TextTokenizer.load(ckpt.tokenizer_path), cfg, label_map, ckpt)


# ------------------------------------------------------------------------------------------------------ input
def read_lines(source: str | None) -> list[str]:
    if source is None or source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TinygraftError(f"input file '{source}' does not exist") from None
        except UnicodeDecodeError:
            raise TinygraftError(f"input file '{source}' is not UTF-8 text") from None
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise TinygraftError(f"{'stdin' if source in (None, '-') else repr(source)} holds no input to predict on")
    return lines


def split_pair(line: str, n: int, what: str) -> list[str]:
    parts = line.split("\t")
    if len(parts) != n:
        raise TinygraftError(f"each input line must hold {what} separated by a tab; got {line[:60]!r}")
    return parts


def read_inputs(ft: Finetuned, source: str | None):
    """The examples of the run's task, unlabeled, from a table file or plain lines."""
    from tinygraft.train.finetune import COLUMNS

    a = ft.config["finetune"]
    task = ft.config["task"]
    text_col, pair_col, _ = (a.get("text_col") or COLUMNS[task][0], a.get("text_pair_col") or COLUMNS[task][1], None)
    table = source not in (None, "-") and Path(source).suffix in TABLES
    if task == "tokens":
        from tinygraft.data.ner import TaggedSentence, read_tagged

        if source not in (None, "-") and Path(source).suffix != ".txt":
            return read_tagged(source, text_col, None)
        return [TaggedSentence(line.split(), None, i + 1) for i, line in enumerate(read_lines(source))]
    if task == "qa":
        from tinygraft.data.qa import QAExample, read_qa_table, read_squad

        if table and Path(source).suffix == ".json":
            return read_squad(source)
        if table:
            return read_qa_table(source, text_col, pair_col, None, None, None, a.get("quote_none", False))
        pairs = [split_pair(line, 2, "a question and a context") for line in read_lines(source)]
        return [QAExample(str(i), "", c, q, [], []) for i, (q, c) in enumerate(pairs)]
    paired = task in ("similarity", "instruct") or (task == "classify" and a.get("text_pair_col"))
    if table:
        return L.read_labeled(source, text_col, None, pair_col if paired else None, quote_none=a.get("quote_none"))
    if paired and task != "instruct":
        return [L.Example(*split_pair(line, 2, "two texts"), None, i + 1) for i, line in enumerate(read_lines(source))]
    return [L.Example(line, None, None, i + 1) for i, line in enumerate(read_lines(source))]


# -------------------------------------------------------------------------------------------------- predicting
@torch.no_grad()
def predict(ft: Finetuned, source: str | None, batch_size: int = 64, max_new_tokens: int = 64) -> list[dict]:
    task, a = ft.config["task"], ft.config["finetune"]
    tok, model = ft.tokenizer, ft.model
    max_length = a["max_length"]
    device = next(model.parameters()).device
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    examples = read_inputs(ft, source)
    if task == "instruct":
        return [_complete(model, tok, ex.text, max_length, max_new_tokens, device) for ex in examples]
    if task == "tokens":
        from tinygraft.data.ner import encode_tagged

        feats = encode_tagged(examples, tok, max_length)
    elif task == "qa":
        from tinygraft.data.qa import make_qa_features

        stride = a.get("doc_stride") or min(128, max_length // 4)
        feats = make_qa_features(examples, tok, max_length, stride, min(64, max_length // 2))
    elif task == "similarity":
        feats = L.encode_pairs(examples, tok, max_length)
    else:
        feats = L.encode_classification(examples, tok, max_length)
    outs = []
    for batch in L.eval_batches(feats, batch_size, pad):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        outputs, _ = model(batch)
        outs.append(({k: v.float().cpu() for k, v in outputs.items() if isinstance(v, torch.Tensor)}, batch))
    return _format(ft, task, examples, feats, outs)


def _format(ft: Finetuned, task: str, examples, feats, outs) -> list[dict]:
    rows = []
    if task == "classify":
        problem, names = ft.config["head"].get("problem", "single_label"), (ft.label_map.names if ft.label_map else [])
        z = torch.cat([o["logits"] for o, _ in outs])
        for ex, zi in zip(examples, z):
            row = {"text": ex.text} if ex.text_pair is None else {"text": ex.text, "text_pair": ex.text_pair}
            if problem == "regression":
                row["score"] = float(zi[0])
            elif problem == "multi_label":
                p = zi.sigmoid()
                row["labels"] = [n for n, pi in zip(names, p) if pi > 0.5]
                row["probabilities"] = {n: round(float(pi), 6) for n, pi in zip(names, p)}
            else:
                p = zi.softmax(-1)
                row["label"] = names[int(p.argmax())]
                row["probabilities"] = {n: round(float(pi), 6) for n, pi in zip(names, p)}
            rows.append(row)
    elif task == "similarity":
        scores = torch.cat([o["scores"] for o, _ in outs])
        rows = [{"text": ex.text, "text_pair": ex.text_pair, "score": float(s)} for ex, s in zip(examples, scores)]
    elif task == "tokens":
        from tinygraft.data.ner import word_predictions

        preds = [(p, w) for o, b in outs for p, w in zip(o["logits"].argmax(-1).tolist(), b["word_ids"])]
        for sent, (p, w) in zip(examples, preds):
            rows.append({"words": sent.words, "tags": word_predictions(p, w, len(sent.words), ft.label_map)})
    elif task == "qa":
        from tinygraft.data.qa import postprocess_qa

        starts, ends = [], []
        for o, b in outs:
            for i in range(o["start_logits"].shape[0]):
                T = int(b["attention_mask"][i].sum())
                starts.append(o["start_logits"][i, :T].numpy())
                ends.append(o["end_logits"][i, :T].numpy())
        answers = postprocess_qa(examples, feats, starts, ends)
        rows = [{"question": ex.question, "answer": ans} for ex, ans in zip(examples, answers)]
    return rows


def _complete(model: TaskModel, tok, prompt: str, max_length: int, max_new_tokens: int, device) -> dict:
    ids = tok.encode(prompt)[-max_length:] or [tok.eos_id]
    gpt = model.backbone
    out = gpt.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.0)[0, len(ids) :].tolist()
    if tok.eos_id in out:
        out = out[: out.index(tok.eos_id)]
    return {"prompt": prompt, "completion": tok.decode(out)}


def predict_command(args) -> int:
    from tinygraft.train.loop import resolve_device

    ft = load_finetuned(args.run, resolve_device(args.device), args.checkpoint)
    rows = predict(ft, args.input, args.batch_size, args.max_new_tokens)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise TinygraftError(f"output '{out}' already exists; pass --overwrite to replace it")
        checkpoint.atomic_write(out, text)
        print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)
    return 0
