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

Under torchrun (`torchrun --nproc_per_node N -m tinygraft pretrain|finetune|distill ...`) each process joins the
process group here (core/dist.py) and only rank 0 prints. An error every rank meets (bad input, a NaN the ranks
agree on) is printed once, by rank 0; an error only one rank meets is printed by that rank, prefixed with its rank,
after a short wait in which rank 0's own exit, if it comes, stops it first. The ranks left waiting on it in a
collective stop without a word (exit 1), torchrun stops the rest and prints its own report naming the failed rank.
"""

import argparse
import errno
import sys
import time

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
from tinygraft.core import dist
from tinygraft.errors import TinygraftError
from tinygraft.train.plugins import load_plugins

DISTRIBUTED = ("pretrain", "finetune", "distill")  # the training commands; the rest run in one process
PEER_STOPPED = 1  # this rank's exit code when another rank's stop broke its collective
LONE_ERROR_WAIT_S = 5.0  # a rank's own error waits this long for rank 0's exit (torchrun polls every 0.1 s)
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


def refuse(sentence: str) -> int:
    """Print an error once: by rank 0, or by the one rank that met it (see the module docstring)."""
    if dist.world() > 1 and not dist.is_main():
        time.sleep(LONE_ERROR_WAIT_S)  # rank 0 met the same error and exited: torchrun stops this rank first
        print(f"error (rank {dist.rank()} of {dist.world()}): {sentence}", file=dist.error_stream(), flush=True)
    else:
        print(f"error: {sentence}", file=sys.stderr, flush=True)
    return TinygraftError.exit_code


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
        if dist.world() > 1:
            if args.command not in DISTRIBUTED:
                raise TinygraftError(
                    f"tinygraft {args.command} runs in one process; launch it without torchrun (only "
                    f"{', '.join(DISTRIBUTED)} run on several)"
                )
            dist.quiet_others()
            dist.start(getattr(args, "device", None) or "auto")
        code = args.func(args)
        dist.stop()
        return code
    except TinygraftError as e:
        return refuse(str(e))
    except OSError as e:
        if e.errno not in OS_REFUSALS:
            raise
        return refuse(os_sentence(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except RuntimeError as e:  # under torchrun: another rank stopped, and said why
        if dist.timed_out(e):
            return refuse(f"this process waited {dist.TIMEOUT_S} s for the others at a collective and gave up (one "
                          "of them hangs, or they disagree on what to exchange: a bug worth reporting)")  # fmt: skip
        if not dist.lost_peer(e):
            raise
        return PEER_STOPPED
