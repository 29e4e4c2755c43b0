"""The `--lora-*` options of `tinygraft pretrain` / `finetune` (with `--method lora`), and the method they build."""

import argparse

from tinygraft.peft.lora import ALL_LINEAR


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (with --method lora)")
    g.add_argument("--lora-r", type=int, default=8, help="rank of the adapters (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scaling numerator: update = alpha/r * B A (16)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", default=ALL_LINEAR,
                   help='"all-linear" (default: every linear layer but the output head), module names a path ends '
                        'with ("c_attn,c_proj", "query,value"), or a regex matched against the full path')  # fmt: skip
    g.add_argument("--lora-rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r) (rsLoRA)")


def lora_settings_from_args(args) -> dict:
    return {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": args.lora_targets,
            "use_rslora": args.lora_rslora}  # fmt: skip


def lora_method_from_args(args, base_path=None):
    """A LoRAMethod from the parsed `--lora-*` options; `base_path` is the pretrained directory the run starts
    from (recorded with its weights' sha256 in every checkpoint)."""
    from tinygraft.train.lora_method import LoRAMethod

    return LoRAMethod(**lora_settings_from_args(args), base_path=base_path)
