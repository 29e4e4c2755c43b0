"""The `tinygraft` command: pretrain, finetune, distill, predict, compare, advise, sample, eval, info, embed, export,
cka, probe, forgetting.

    pretrain   pre-train a GPT (causal LM) or BERT (masked LM) preset, or continue one `--from` a pretrained
               directory or run; `--method lora` trains adapters only
    finetune   a pretrained model + a task head on labeled data (full, linear-probe, top-k, gradual-unfreeze, lora)
    distill    a smaller student trained from a teacher (soft labels, hidden states, attention relations)
    predict    a fine-tuned run's predictions on a file or stdin
    compare    several fine-tuning methods on one task: the transfer-learning table
    advise     which method to use: the data, the domain gap, what the model knows and each method's cost, measured
    sample     text from a GPT checkpoint
    eval       validation loss and perplexity of a checkpoint
    info       what a run, a checkpoint, a Hugging Face directory or `minilm` holds
    embed      sentence embeddings from a pretrained model or a run
    export     a run in the Hugging Face layout (adapters merged), or an adapter run's adapter in peft's layout
    cka        how alike two checkpoints' layers are on the same texts: CKA (debiased, biased) and SVCCA
    probe      a linear probe per layer on frozen features (classify or tokens), beside the baselines
    forgetting continued runs side by side: their own domain's loss and each watched text's, before and after

Every bad input becomes a `TinygraftError`, printed as `error: <one sentence>` with exit code 2 and no traceback;
any other exception is a bug and keeps its traceback. Ctrl-C during training saves a checkpoint and exits 130.
Tasks and methods of the user's own modules join with `TINYGRAFT_PLUGINS=module[,module]` (train/plugins.py).
"""

import argparse
import errno
import sys

from tinygraft.cli import (
    advise,
    cka,
    compare,
    distill,
    embed,
    export,
    finetune,
    forgetting,
    info,
    predict,
    pretrain,
    probe,
    sample,
)
from tinygraft.cli import eval as eval_
from tinygraft.cli.common import INTERRUPTED, apply_revision
from tinygraft.errors import TinygraftError
from tinygraft.train.plugins import load_plugins

COMMANDS = (pretrain, finetune, distill, predict, compare, advise, sample, eval_, info, embed, export, cka, probe,
            forgetting)  # fmt: skip
# The environment's refusals: a read-only or full disk, a quota, a file the user may not read or write. Any other
# OSError is a bug and keeps its traceback.
OS_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_sentence(e: OSError) -> str:
    where = f" '{e.filename}'" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "the file is too large for the file system"}[e.errno]  # fmt: skip
        return f"cannot write{where}: {what}; free some space and run the command again (a run goes on with --resume)"
    if e.errno == errno.EROFS:
        return f"cannot write{where}: the file system is read-only; write somewhere else"
    return f"permission denied for{where}; use a place you are allowed to write to (or read from)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygraft", description="Train and inspect small transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        load_plugins()
    except TinygraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return TinygraftError.exit_code
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        apply_revision(args)
        return args.func(args)
    except TinygraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return TinygraftError.exit_code
    except OSError as e:
        if e.errno not in OS_REFUSALS:
            raise
        print(f"error: {os_sentence(e)}", file=sys.stderr)
        return TinygraftError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
