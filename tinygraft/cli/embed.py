"""`tinygraft embed --from PATH`: sentence embeddings of a file or stdin (infer/embed.py)."""

import argparse
import sys

from tinygraft.cli.common import adapter_name_arg, revision_arg
from tinygraft.errors import TinygraftError
from tinygraft.infer.embed import check_output, load_encoder, read_texts, write_embeddings
from tinygraft.models.pooling import sentence_embeddings
from tinygraft.train.loop import resolve_device


def add(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings of a text file from a pretrained model or a run")
    p.add_argument("--from", dest="from_", required=True, help="a pretrained directory, 'minilm', or a run")
    revision_arg(p, "from_", "--from")
    p.add_argument("--input", help="one text per line, or JSONL with a text field (default: stdin)")
    p.add_argument("--output", help="out.npy or out.jsonl (default: JSONL on stdout)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None, help="L2-normalise")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    adapter_name_arg(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    """CLI: args.from_ (or getattr(args, "from")), args.input, args.output, args.normalize (True / False / None =
    the checkpoint's own choice), optional args.batch_size, args.device, args.overwrite."""
    spec = getattr(args, "from_", None) or getattr(args, "from", None)
    if spec is None:
        raise TinygraftError("embed needs --from PATH (a pretrained directory, 'minilm', or a run)")
    output, overwrite = getattr(args, "output", None), getattr(args, "overwrite", False)
    if output not in (None, "-"):
        check_output(output, overwrite)
    texts = read_texts(getattr(args, "input", None))
    device = resolve_device(getattr(args, "device", None) or "auto")
    model, tokenizer, pooling = load_encoder(spec, device, getattr(args, "adapter_name", None))
    vectors = sentence_embeddings(
        model,
        tokenizer,
        texts,
        pooling,
        normalize=getattr(args, "normalize", None),
        batch_size=getattr(args, "batch_size", None) or 32,
    )
    write_embeddings(vectors, texts, output, overwrite)
    if output not in (None, "-"):
        print(f"wrote {len(texts)} embeddings of size {vectors.shape[1]} to {output}", file=sys.stderr)
    return 0
