"""Named model sizes. Every head dim is in {16, 32, 64, 128}, the sizes the attention kernel is built for."""

from tinygraft.errors import TinygraftError
from tinygraft.models.bert import BERTConfig, BERTForMaskedLM
from tinygraft.models.gpt import GPT, GPTConfig

PRESETS: dict[str, GPTConfig | BERTConfig] = {
    # Small enough to pre-train on 2 CPU cores in minutes; vocab_size is replaced by the trained tokenizer's.
    "gpt-tiny": GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    "gpt2": GPTConfig(),  # GPT-2 small, 124M parameters
    # google/bert_uncased_L-2_H-128_A-2 (Turc et al., 2019) sizes.
    "bert-tiny": BERTConfig(
        vocab_size=8192, max_position_embeddings=512, n_layer=2, n_head=2, n_embd=128, intermediate_size=512
    ),
    "bert-base": BERTConfig(),  # bert-base-uncased, 110M parameters
}


def get_preset(name: str) -> GPTConfig | BERTConfig:
    if name not in PRESETS:
        raise TinygraftError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    return type(cfg)(**vars(cfg))  # a copy: callers may change it


def family(cfg: GPTConfig | BERTConfig) -> str:
    if isinstance(cfg, GPTConfig):
        return "gpt"
    if isinstance(cfg, BERTConfig):
        return "bert"
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def build_model(cfg: GPTConfig | BERTConfig):
    """GPT for a GPT config, BERT with its masked-LM head for a BERT config (what pre-training trains)."""
    return GPT(cfg) if family(cfg) == "gpt" else BERTForMaskedLM(cfg)
