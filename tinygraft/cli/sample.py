"""`tinygraft sample`: text from a GPT checkpoint (infer/sample.py)."""

from tinygraft.cli.common import adapter_name_arg, checkpoint_args
from tinygraft.infer.sample import sample


def add(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a GPT checkpoint")
    checkpoint_args(p, "a run (or its checkpoints/ or a step directory), or a GPT-2 directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-kv-cache", action="store_true", help="re-read the whole context at each token")
    adapter_name_arg(p)
    p.set_defaults(func=run)


def run(ns) -> int:
    texts = sample(
        ns.run,
        prompt=ns.prompt,
        max_new_tokens=ns.tokens,
        temperature=ns.temperature,
        top_k=ns.top_k or None,
        top_p=ns.top_p,
        seed=ns.seed,
        num_samples=ns.num_samples,
        use_cache=not ns.no_kv_cache,
        device=ns.device,
        which=ns.checkpoint,
        adapter=ns.adapter_name,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0
