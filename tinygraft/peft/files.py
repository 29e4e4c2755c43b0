"""LoRA, DoRA, IA3, prompt- and prefix-tuning adapters in peft's file layout, so they move both ways between
tinygraft and `peft`; bottleneck adapters in a layout of ours shaped like it.

    DIR/adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    DIR/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                    base_model.model.<module path>.lora_B.weight  (out, r)

    IA3: {"peft_type": "IA3", "target_modules": [...], "feedforward_modules": [...], ...}
                                    base_model.model.<module path>.ia3_l  (out, 1), or (1, in) feed-forward
    bottleneck adapters, ours (peft has none): {"peft_type": "BOTTLENECK", "variant": "houlsby", "reduction": 16,
                                    "non_linearity": "relu", "target_modules": [...]}
                                    base_model.model.<module path>.adapter_down.weight (hidden/reduction, hidden)
                                    ... .adapter_down.bias, .adapter_up.weight (hidden, hidden/reduction), .bias
    prompt tuning: {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": N, "token_dim": C, ...}
                                    prompt_embeddings  (N, C)               (no path: peft keeps one per model)
    prefix tuning: {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": N, "num_layers": L, ...}
                                    prompt_embeddings  (N, L * 2 * C)       the reparametrisation MLP folded in

peft's keys are its module paths inside `PeftModel(base)` (hence the `base_model.model.` prefix) with the adapter
name dropped. A task model's adapter (a fine-tuned classifier, tagger or reader) also names its `task_type` and
carries the head as `modules_to_save` (`base_model.model.classifier.weight`, ...), the backbone's keys then sitting
under the task model's prefix (`base_model.model.bert.`). A peft config that asks for something this LoRA does not
compute (per-layer ranks, trained biases, extra full modules, ...) is refused by name rather than loaded into
the wrong math.
"""

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError
from tinygraft.peft.adapters import DEFAULT_ADAPTER, adapter_state_dict, candidates, load_adapter_state_dict
from tinygraft.peft.bottleneck import add_bottleneck, bottleneck_layers, bottleneck_settings
from tinygraft.peft.ia3 import add_ia3, ia3_layers, ia3_settings
from tinygraft.peft.lora import add_lora, load_lora_state_dict, lora_layers, lora_settings, lora_state_dict
from tinygraft.peft.prompt import PrefixConfig, add_prefix_tuning, add_prompt_tuning, prompt_settings, virtual_layers

CONFIG_NAME = "adapter_config.json"
BOTTLENECK = "BOTTLENECK"  # our peft_type for bottleneck adapters
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
PROMPT_KEY = "prompt_embeddings"
PEFT_PREFIX = "base_model.model."

# peft config keys whose non-default values change the math; we refuse those rather than compute something else.
IA3_UNSUPPORTED = {"modules_to_save": None, "exclude_modules": None}
UNSUPPORTED = {
    "bias": "none", "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "lora_bias": False, "use_qalora": False,
    "target_parameters": None, "trainable_token_indices": None, "exclude_modules": None,
    "alora_invocation_tokens": None,
}  # fmt: skip


def _compact_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """peft `target_modules`: the last names of the wrapped paths when they pick out exactly those layers, else the
    full paths (a list entry matches a path equal to it or ending in "." + it, in peft as here)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    picked = {n for n in candidates(model) if any(n == leaf or n.endswith("." + leaf) for leaf in leaves)}
    return leaves if picked == set(paths) else sorted(paths)


def _is_ia3(model: nn.Module, adapter_name: str | None) -> bool:
    return any(layer.adapter_in(adapter_name) is not None for _, layer in ia3_layers(model))


def _ia3_config(model: nn.Module, adapter_name: str, base_model_name_or_path) -> dict:
    s = ia3_settings(model, adapter_name)
    return {
        "peft_type": "IA3",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "target_modules": _compact_targets(model, s["paths"]),
        "feedforward_modules": _compact_targets(model, s["feedforward"]) if s["feedforward"] else [],
        "fan_in_fan_out": s["fan_in_fan_out"],
        "init_ia3_weights": True,
        "modules_to_save": None,
    }


def _bottleneck_config(model: nn.Module, adapter_name: str, base_model_name_or_path) -> dict:
    s = bottleneck_settings(model, adapter_name)
    return {
        "peft_type": BOTTLENECK,
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "variant": s["variant"],
        "reduction": s["reduction"],
        "non_linearity": s["act"],
        "target_modules": _compact_targets(model, s["paths"]),
    }


def _is_prompt(model: nn.Module, adapter_name: str | None) -> bool:
    return any(layer.adapter_in(adapter_name) is not None for _, layer in virtual_layers(model))


def _prompt_config(model: nn.Module, adapter_name: str, base_model_name_or_path) -> dict:
    """peft's PromptTuningConfig / PrefixTuningConfig (as trained: a reparametrised prefix says so, and its files
    hold it folded), plus `prefix_positions`, ours, which peft ignores."""
    _, config, layer = prompt_settings(model, adapter_name)
    prefix = isinstance(config, PrefixConfig)
    out = {
        "peft_type": "PREFIX_TUNING" if prefix else "PROMPT_TUNING",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": layer.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": layer.n_head,
        "num_layers": layer.n_layer,
    }
    if prefix:
        out.update(prefix_projection=config.prefix_projection, encoder_hidden_size=config.prefix_hidden,
                   prefix_positions=config.prefix_positions)  # fmt: skip
    else:
        out.update(prompt_tuning_init="RANDOM")  # how it started does not matter to a trained prompt
    return out


def adapter_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, base_model_name_or_path=None) -> dict:
    """The adapter_config.json peft writes for this adapter (the fields it reads; the rest take peft's defaults)."""
    if _is_prompt(model, adapter_name):
        return _prompt_config(model, adapter_name, base_model_name_or_path)
    if any(layer.adapter_in(adapter_name) is not None for _, layer in bottleneck_layers(model)):
        return _bottleneck_config(model, adapter_name, base_model_name_or_path)
    if _is_ia3(model, adapter_name):
        return _ia3_config(model, adapter_name, base_model_name_or_path)
    s = lora_settings(model, adapter_name)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": s["r"],
        "lora_alpha": int(s["alpha"]) if float(s["alpha"]).is_integer() else s["alpha"],
        "lora_dropout": s["dropout"],
        "use_rslora": s["use_rslora"],
        "target_modules": _compact_targets(model, s["paths"]),
        "fan_in_fan_out": s["fan_in_fan_out"],
        "bias": "none",
        "init_lora_weights": "pissa" if s["lora_init"] == "pissa" else True,
        "modules_to_save": None,
        "use_dora": s["use_dora"],
    }


def _pissa_as_plain_lora(model: nn.Module, adapter_name: str, config: dict, state: dict) -> tuple[dict, dict]:
    """A PiSSA adapter as a plain LoRA adapter of rank 2r over the original, unchanged base (as peft converts it):
    the trained update over the base's residual, s B A + (W - s B0 A0) - W, is s [B, -B0] [A; A0]."""
    state = dict(state)
    for path, layer in lora_layers(model):
        name = layer.adapter_in(adapter_name)
        if name is None or name not in layer.pissa_A0:
            continue
        a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
        state[f"{path}.lora_A.weight"] = torch.cat([a, layer.pissa_A0[name].to(a.dtype)], dim=0)
        state[f"{path}.lora_B.weight"] = torch.cat([b, -layer.pissa_B0[name].to(b.dtype)], dim=1)
    r, alpha = config["r"], float(config["lora_alpha"])
    alpha2 = alpha * math.sqrt(2) if config["use_rslora"] else 2 * alpha  # the same scaling at rank 2r
    return {**config, "r": 2 * r, "lora_alpha": int(alpha2) if alpha2.is_integer() else alpha2,
            "init_lora_weights": True}, state  # fmt: skip


@dataclass
class PeftHead:
    """What peft's task models (PeftModelForSequenceClassification, ...) read beside the LoRA weights: the task
    type, the head's tensors under transformers' names, and where the backbone sits in the task model."""

    task_type: str  # "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"
    tensors: dict[str, torch.Tensor]  # {"classifier.weight": ..., "classifier.bias": ...}
    backbone_prefix: str = "bert."


def save_adapter(
    model: nn.Module,
    directory,
    adapter_name: str = DEFAULT_ADAPTER,
    base_model_name_or_path=None,
    head: PeftHead | None = None,
):
    """Write DIR/adapter_config.json and DIR/adapter_model.safetensors (peft's layout) for one adapter; with a
    `head`, keyed for peft's task model of that type (the backbone under its prefix, the head as modules_to_save).

    Each file is written beside its final name and renamed into place, with the mode its directory's other files
    get (safetensors alone would make it owner-only)."""
    directory = Path(directory)
    config = adapter_config(model, adapter_name, base_model_name_or_path)
    prefix = PEFT_PREFIX + (head.backbone_prefix if head else "")
    state = adapter_state_dict(model, adapter_name, saved=True)
    if config.get("init_lora_weights") == "pissa":
        config, state = _pissa_as_plain_lora(model, adapter_name, config, state)
    tensors = {prefix + k: v.contiguous() for k, v in state.items()}
    if config["peft_type"] in PROMPT_TYPES:  # one table per model, keyed without a path
        tensors = {PROMPT_KEY: next(iter(state.values())).contiguous()}
        # peft applies prompts in its task models only: a causal LM's, or plain feature extraction for an encoder
        path = next(iter(state)).rsplit(".", 1)[0]
        config["task_type"] = "CAUSAL_LM" if path.endswith("transformer.wte") else "FEATURE_EXTRACTION"
        if "prefix_projection" in config:
            config["prefix_projection"] = False  # saved folded: peft reads it as plain prefixes
        if config.get("prefix_positions") == "after":
            del config["prefix_positions"]  # peft's own numbering, which a file without the key means
    if head is not None:
        config["task_type"] = head.task_type
        config["modules_to_save"] = sorted({name.split(".")[0] for name in head.tensors})
        tensors.update({PEFT_PREFIX + k: v.detach().contiguous() for k, v in head.tensors.items()})
    directory.mkdir(parents=True, exist_ok=True)
    tmp_config, tmp_weights = (directory / f".{name}.tmp-{os.getpid()}" for name in (CONFIG_NAME, WEIGHTS_NAME))
    try:
        tmp_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        os.chmod(tmp_weights, stat.S_IMODE(tmp_config.stat().st_mode))
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        tmp_config.unlink(missing_ok=True)
        tmp_weights.unlink(missing_ok=True)


def read_adapter_config(directory) -> dict:
    """The adapter_config.json in DIR, checked for the LoRA features tinygraft computes."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise TinygraftError(
            f"no {CONFIG_NAME} in {directory}; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    config = read_json(path, "adapter config")
    kind = config.get("peft_type", "LORA")
    if kind not in ("LORA", "IA3", BOTTLENECK, *PROMPT_TYPES):
        raise TinygraftError(f"{path} holds a {kind} adapter; tinygraft loads LoRA, DoRA, IA3, prompt tuning, prefix "
                             "tuning and bottleneck adapters")  # fmt: skip
    if kind in PROMPT_TYPES:
        if config.get("num_transformer_submodules", 1) not in (1, None):
            n = config["num_transformer_submodules"]
            raise TinygraftError(f"{path} is a prompt for an encoder-decoder model (num_transformer_submodules={n}); "
                                 "tinygraft's GPT and BERT take one")  # fmt: skip
        if "num_virtual_tokens" not in config:
            raise TinygraftError(f"{path} has no 'num_virtual_tokens'")
        return config
    if kind == BOTTLENECK:
        for key in ("variant", "reduction", "non_linearity", "target_modules"):
            if key not in config:
                raise TinygraftError(f"{path} has no {key!r}")
        return config
    if kind == "IA3":
        for key, default in IA3_UNSUPPORTED.items():
            if config.get(key, default) != default and config.get(key) not in (None, [], {}):
                raise TinygraftError(f"{path} sets {key}={config[key]!r}, which tinygraft's IA3 does not implement")
        for key in ("target_modules", "feedforward_modules"):
            if key not in config:
                raise TinygraftError(f"{path} has no {key!r}")
        return config
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, [], False):
            raise TinygraftError(f"{path} sets {key}={config[key]!r}, which tinygraft's LoRA does not implement")
    for key in ("r", "target_modules"):
        if key not in config:
            raise TinygraftError(f"{path} has no {key!r}")
    return config


def load_adapter(
    model: nn.Module, directory, adapter_name: str = DEFAULT_ADAPTER, freeze_base: bool = True, fused: bool = True
) -> int:
    """Add the adapter in DIR (peft layout, written here or by peft) to `model` and load its weights; returns the
    trainable parameter count. Layers the model already wraps with `adapter_name` are loaded, not re-added."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise TinygraftError(f"no {WEIGHTS_NAME} in {directory} (peft's .bin format is not read: it is a pickle)")
    state = load_file(str(weights))
    if config.get("peft_type") in PROMPT_TYPES:
        return _load_prompt(model, directory, config, state, adapter_name, freeze_base)
    bad = [k for k in state if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise TinygraftError(f"{weights} key {bad[0]!r} does not start with {PEFT_PREFIX!r}; not a peft LoRA file")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq")):  # they change the base
        raise TinygraftError(
            f"{directory} holds a LoRA adapter initialised with {init!r} and saved without converting it: it adapts "
            "peft's residual base, not this one (save it in peft with path_initial_model_for_weight_conversion)"
        )
    kind = config.get("peft_type")
    if kind in ("IA3", BOTTLENECK):
        targets = (
            config["target_modules"] if isinstance(config["target_modules"], str) else list(config["target_modules"])
        )
        if kind == BOTTLENECK and not any(adapter_name in layer.settings for _, layer in bottleneck_layers(model)):
            add_bottleneck(model, config["variant"], targets, int(config["reduction"]), config["non_linearity"],
                           adapter_name, freeze_base)  # fmt: skip
        if kind == "IA3" and not any(adapter_name in layer.settings for _, layer in ia3_layers(model)):
            ff = config["feedforward_modules"]
            add_ia3(model, targets, ff if isinstance(ff, str) else list(ff), adapter_name, freeze_base)
        dtype_of = {k: v.dtype for k, v in adapter_state_dict(model, adapter_name).items()}
        load_adapter_state_dict(model, {k: v.to(dtype_of.get(k, v.dtype)) for k, v in state.items()}, adapter_name)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    has_it = any(adapter_name in layer.settings for _, layer in lora_layers(model))
    if not has_it:
        targets = config["target_modules"]
        add_lora(
            model,
            targets if isinstance(targets, str) else list(targets),
            r=int(config["r"]),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            adapter_name=adapter_name,
            freeze_base=freeze_base,
            fused=fused,
        )
    dtype_of = {k: v.dtype for k, v in lora_state_dict(model, adapter_name).items()}
    load_lora_state_dict(model, {k: v.to(dtype_of.get(k, v.dtype)) for k, v in state.items()}, adapter_name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _load_prompt(model: nn.Module, directory: Path, config: dict, state: dict, adapter_name: str, freeze_base) -> int:
    """A prompt or prefix (peft's, or ours folded): checked against the model's shape, loaded as a plain table."""
    if set(state) != {PROMPT_KEY}:
        extra = sorted(set(state) - {PROMPT_KEY})
        raise TinygraftError(f"{directory / WEIGHTS_NAME} should hold only {PROMPT_KEY!r}; it has "
                             f"{extra[0] if extra else 'not that'!r}")  # fmt: skip
    n, prefix = int(config["num_virtual_tokens"]), config["peft_type"] == "PREFIX_TUNING"
    if not any(adapter_name in layer.settings for _, layer in virtual_layers(model)):
        if prefix:  # peft numbers the real tokens after the prefix; a file of ours says when it does not
            add_prefix_tuning(model, n, positions=config.get("prefix_positions", "after"), adapter_name=adapter_name,
                              freeze_base=freeze_base)  # fmt: skip
        else:
            add_prompt_tuning(model, n, "random", adapter_name=adapter_name, freeze_base=freeze_base)
    _, _, layer = prompt_settings(model, adapter_name)
    for key, have in (("token_dim", layer.dim), ("num_layers", layer.n_layer), ("num_attention_heads", layer.n_head)):
        if key in config and config[key] is not None and int(config[key]) != have and (prefix or key == "token_dim"):
            raise TinygraftError(f"the adapter in {directory} was saved for a base with {key}={config[key]}; this "
                                 f"model has {have}")  # fmt: skip
    table = layer.prompt_embeddings[adapter_name]
    got = state[PROMPT_KEY]
    if adapter_name in layer.prefix_mlp or tuple(got.shape) != tuple(table.shape):
        raise TinygraftError(f"{PROMPT_KEY} in {directory} is {tuple(got.shape)}; this model's {adapter_name!r} "
                             f"adapter takes {tuple(table.shape)}")  # fmt: skip
    with torch.no_grad():
        table.copy_(got.to(table.dtype))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
