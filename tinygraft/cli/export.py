"""`tinygraft export RUN`: a run in the Hugging Face layout, or an adapter run's adapter in peft's (infer/export.py)."""

from tinygraft.cli.common import adapter_name_arg
from tinygraft.errors import TinygraftError
from tinygraft.infer.export import export_adapter, export_run


def add(sub) -> None:
    p = sub.add_parser("export", help="a run's kept checkpoint in the Hugging Face layout, or an adapter run's adapter")
    p.add_argument("run", help="a run directory")
    p.add_argument("--to", help="write the model here in the Hugging Face layout (an adapter run: adapter merged)")
    p.add_argument("--merged", action="store_true", help="with --to: insist the run is an adapter run and merge it")
    p.add_argument("--adapter", metavar="DIR", help="write an adapter run's adapter (LoRA, IA3) here in peft's layout")
    p.add_argument("--checkpoint", choices=("latest", "best"), default=None, help="default: what results.json kept")
    p.add_argument("--max-shard-size", metavar="SIZE", help="with --to: split the weights into shards of at most SIZE "
                   "(5GB, 500MB, 2GiB, or bytes; default 50GB, as transformers' save_pretrained)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true")
    adapter_name_arg(p)
    p.set_defaults(func=run)


def run(ns) -> int:
    which, overwrite = getattr(ns, "checkpoint", None), getattr(ns, "overwrite", False)
    to, adapter = getattr(ns, "to", None), getattr(ns, "adapter", None)
    if to is None and adapter is None:
        raise TinygraftError("export needs --to DIR (the model, adapters merged) or --adapter DIR (an adapter's files)")
    if getattr(ns, "max_shard_size", None) is not None and to is None:
        raise TinygraftError("--max-shard-size splits the model written with --to DIR; an adapter is one small file")
    if to is not None:
        done = export_run(ns.run, to, which, overwrite, merged=getattr(ns, "merged", False),
                          adapter_name=getattr(ns, "adapter_name", None),
                          max_shard_size=getattr(ns, "max_shard_size", None))  # fmt: skip
        print(
            f"exported {done['checkpoint']} as {done['architecture']} ({done['params']:,} parameters) to {done['to']}"
        )
        for note in done["notes"]:
            print(f"note: {note}")
    if adapter is not None:
        done = export_adapter(ns.run, adapter, which, overwrite, getattr(ns, "adapter_name", None))
        print(
            f"exported the {done['method']} adapter of {done['checkpoint']} ({done['params']:,} parameters, base "
            f"{done['base']}) to {done['to']} in peft's layout"
        )
        for note in done["notes"]:
            print(f"note: {note}")
    return 0
