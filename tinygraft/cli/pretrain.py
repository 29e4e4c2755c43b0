"""`tinygraft pretrain`: pre-train a GPT (causal LM) or BERT (masked LM), or continue one `--from` a checkpoint."""

import dataclasses
import json
import sys

from tinygraft.cli.common import INTERRUPTED, config_args, revision_arg
from tinygraft.cli.flags import add_settings, given
from tinygraft.core import precision
from tinygraft.train import methods
from tinygraft.train.config import ContinualSettings, TrainConfig
from tinygraft.train.pretrain import PretrainArgs, pretrain

PREFIX = "method_settings."
KEEP = "continual."


def add(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train a GPT (causal LM) or BERT (masked LM) preset on a corpus")
    p.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints)")
    p.add_argument("--preset", help="gpt-tiny (default), gpt2, bert-tiny, bert-base")
    config_args(p, "data, train, model, method_settings, continual")
    p.add_argument(
        "--data",
        help="corpus: a text file, JSONL, Parquet, a `datasets` save_to_disk DIR[:SPLIT] (default split: train), or a "
        "directory (default: pydoc_data.topics)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps; fixes the learning-rate schedule")
    p.add_argument("--stop-at", type=int, help="stop after this step without changing the schedule")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", choices=precision.PRECISIONS, help=precision.HELP)
    p.add_argument("--seed", type=int, help="seed of the model init, data order and dropout")
    p.add_argument("--keep", type=int, help="step checkpoints to keep")
    p.add_argument("--fsdp", action="store_true", default=None, help=FSDP_HELP)
    p.add_argument(
        "--from",
        dest="from_",
        metavar="PATH",
        help="continue from these weights and tokenizer: a Hugging Face directory or hub cache entry (hf:ORG/NAME), "
        "'minilm', or a run",
    )
    revision_arg(p, "from_", "--from")
    p.add_argument(
        "--new-head",
        action="store_true",
        help="with --from a BERT that has no masked-LM head (MiniLM): start one from a fresh init",
    )
    add_settings(p, ContinualSettings, KEEP, title="continued pre-training without forgetting (with --from)")
    names = methods.names_for("pretrain")
    p.add_argument("--method", help=f"{', '.join(names)} (default full: every weight trains)")
    for name in names:
        cls = methods.METHODS[name]
        add_settings(p, cls.Settings, PREFIX, title=f"--method {name}: {cls.summary}")
    p.set_defaults(func=run)


FSDP_HELP = {f.name: f for f in dataclasses.fields(TrainConfig)}["fsdp"].metadata["help"]


def run(ns) -> int:
    settings = {k[len(PREFIX) :]: v for k, v in given(ns).items() if k.startswith(PREFIX)}
    keep = {k[len(KEEP) :]: v for k, v in given(ns).items() if k.startswith(KEEP)}
    outcome = pretrain(
        PretrainArgs(
            out=ns.out,
            preset=ns.preset,
            config=ns.config,
            data=ns.data,
            steps=ns.steps,
            stop_at=ns.stop_at,
            resume=ns.resume,
            overwrite=ns.overwrite,
            device=ns.device,
            precision=ns.precision,
            seed=ns.seed,
            keep=ns.keep,
            fsdp=ns.fsdp,
            sets=ns.sets,
            from_=ns.from_,
            new_head=ns.new_head,
            method=ns.method,
            method_settings=settings,
            continual=keep,
        )
    )
    if outcome.status == "interrupted":
        print(
            f"interrupted: saved step {outcome.step} in {ns.out}/checkpoints; continue with "
            f"`tinygraft pretrain --out {ns.out} --resume`",
            file=sys.stderr,
        )
        return INTERRUPTED
    if outcome.status == "stopped":
        print(f"stopped at step {outcome.step} (--stop-at); continue with --resume", file=sys.stderr)
    print(json.dumps({k: outcome.results[k] for k in ("step", "metrics", "train_seconds", "tokens_per_s")}))
    return 0
