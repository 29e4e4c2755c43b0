"""The `tinygraft` command: pretrain, finetune, predict, compare, sample, eval, info, embed, export.

    pretrain   pre-train a GPT (causal LM) or BERT (masked LM) preset, or continue one `--from` a pretrained
               directory or run; `--method lora` trains adapters only
    finetune   a pretrained model + a task head on labeled data (full, linear-probe, top-k, gradual-unfreeze, lora)
    predict    a fine-tuned run's predictions on a file or stdin
    compare    several fine-tuning methods on one task: the transfer-learning table
    sample     text from a GPT checkpoint
    eval       validation loss and perplexity of a checkpoint
    info       what a run, a checkpoint, a Hugging Face directory or `minilm` holds
    embed      sentence embeddings from a pretrained model or a run
    export     a run in the Hugging Face layout (LoRA merged), or a LoRA run's adapter in peft's layout

Every bad input becomes a `TinygraftError`, printed as `error: <one sentence>` with exit code 2 and no traceback;
any other exception is a bug and keeps its traceback. Ctrl-C during training saves a checkpoint and exits 130.
"""

import argparse
import json
import sys

from tinygraft.errors import TinygraftError
from tinygraft.train.lora_cli import add_lora_arguments

INTERRUPTED = 130  # the shell's code for "ended by SIGINT"


def cmd_pretrain(args) -> int:
    from tinygraft.train.lora_cli import lora_settings_from_args
    from tinygraft.train.pretrain import PretrainArgs, pretrain

    outcome = pretrain(
        PretrainArgs(
            out=args.out, preset=args.preset, config=args.config, data=args.data, steps=args.steps,
            stop_at=args.stop_at, resume=args.resume, overwrite=args.overwrite, device=args.device, seed=args.seed,
            keep=args.keep, sets=args.set, from_=args.from_, new_head=args.new_head, method=args.method,
            lora=lora_settings_from_args(args),
        )
    )
    if outcome.status == "interrupted":
        print(
            f"interrupted: saved step {outcome.step} in {args.out}/checkpoints; continue with "
            f"`tinygraft pretrain --out {args.out} --resume`",
            file=sys.stderr,
        )
        return INTERRUPTED
    if outcome.status == "stopped":
        print(f"stopped at step {outcome.step} (--stop-at); continue with --resume", file=sys.stderr)
    print(json.dumps({k: outcome.results[k] for k in ("step", "metrics", "train_seconds", "tokens_per_s")}))
    return 0


def cmd_sample(args) -> int:
    from tinygraft.train.sample import sample

    texts = sample(
        args.run, prompt=args.prompt, max_new_tokens=args.tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, num_samples=args.num_samples,
        use_cache=not args.no_kv_cache, device=args.device, which=args.checkpoint,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def cmd_eval(args) -> int:
    from tinygraft.train.evaluate import evaluate

    result = evaluate(args.run, data=args.data, max_batches=args.batches, device=args.device, which=args.checkpoint)
    print(
        f"step {result['step']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
        f"on {result['tokens']:,} tokens of {result['source']}"
    )
    return 0


def cmd_info(args) -> int:
    from tinygraft.train.info import format_info, info

    d = info(args.run, which=args.checkpoint)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def cmd_embed(args) -> int:
    from tinygraft.train.embed import embed_command

    return embed_command(args)


def cmd_export(args) -> int:
    from tinygraft.train.export import export_command

    return export_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygraft", description="Train and inspect small transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pre-train a GPT (causal LM) or BERT (masked LM) preset on a corpus")
    p.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints)")
    p.add_argument("--preset", help="gpt-tiny (default), gpt2, bert-tiny, bert-base")
    p.add_argument("--config", help="a TOML file of settings (sections data, train, model)")
    p.add_argument("--data", help="corpus: a text file, JSONL, or a directory (default: pydoc_data.topics)")
    p.add_argument("--steps", type=int, help="optimizer steps; fixes the learning-rate schedule")
    p.add_argument("--stop-at", type=int, help="stop after this step without changing the schedule")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, help="seed of the model init, data order and dropout")
    p.add_argument("--keep", type=int, help="step checkpoints to keep")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. train.lr=1e-3 (repeatable)")
    p.add_argument("--from", dest="from_", metavar="PATH",
                   help="continue from these weights and tokenizer: a Hugging Face directory, 'minilm', or a run")
    p.add_argument("--new-head", action="store_true",
                   help="with --from a BERT that has no masked-LM head (MiniLM): start one from a fresh init")
    p.add_argument("--method", help="full (default: every weight trains) or lora (adapters over a frozen base)")
    add_lora_arguments(p)
    # None = not given: a new run takes lora_cli's defaults, --resume keeps the checkpoint's settings.
    p.set_defaults(func=cmd_pretrain, lora_r=None, lora_alpha=None, lora_dropout=None, lora_targets=None,
                   lora_rslora=None)  # fmt: skip

    def checkpoint_args(p, what="a run directory, its checkpoints/ directory, or one step directory"):
        p.add_argument("run", help=what)
        p.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="which pointer to follow")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")

    p = sub.add_parser("sample", help="generate text from a GPT checkpoint")
    checkpoint_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-kv-cache", action="store_true", help="re-read the whole context at each token")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    checkpoint_args(p)
    p.add_argument("--data", help="corpus to score (default: the run's validation split)")
    p.add_argument("--batches", type=int, help="at most this many batches")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="what a run, checkpoint, Hugging Face directory or 'minilm' holds")
    checkpoint_args(p, "a run, its checkpoints/ or a step directory, a Hugging Face directory, or 'minilm'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("embed", help="sentence embeddings of a text file from a pretrained model or a run")
    p.add_argument("--from", dest="from_", required=True, help="a pretrained directory, 'minilm', or a run")
    p.add_argument("--input", help="one text per line, or JSONL with a text field (default: stdin)")
    p.add_argument("--output", help="out.npy or out.jsonl (default: JSONL on stdout)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None, help="L2-normalise")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("export", help="a run's kept checkpoint in the Hugging Face layout, or a LoRA run's adapter")
    p.add_argument("run", help="a run directory")
    p.add_argument("--to", help="write the model here in the Hugging Face layout (a LoRA run: adapter merged)")
    p.add_argument("--merged", action="store_true", help="with --to: insist the run is a LoRA run and merge it")
    p.add_argument("--adapter", metavar="DIR", help="write a LoRA run's adapter here in peft's layout")
    p.add_argument("--checkpoint", choices=("latest", "best"), default=None, help="default: what results.json kept")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    from tinygraft.train.finetune_cli import add_finetune_commands

    add_finetune_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except TinygraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return TinygraftError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
