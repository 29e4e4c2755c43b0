"""`--method prompt-tuning` and `--method prefix-tuning`: learned virtual tokens (peft/prompt.py) on our GPT and BERT,
the base frozen, a TaskModel's head trained whole.

prompt tuning's settings are --num-virtual-tokens and --prompt-init ("text:WORDS" reads the base's tokenizer);
prefix tuning's --num-virtual-tokens, --prefix-projection, --prefix-hidden and --prefix-positions. Checkpoints hold the
prompt or prefix (the reparametrisation MLP too, so training resumes where it stopped; exported adapters fold it),
adapter_config.json in peft's layout and base.json (methods/adapter.py).
"""

from pathlib import Path

import torch
from torch import nn

from tinygraft.errors import TinygraftError
from tinygraft.models.pretrained import load_tokenizer, locate
from tinygraft.peft.adapters import DEFAULT_ADAPTER
from tinygraft.peft.files import CONFIG_NAME, adapter_config, read_adapter_config
from tinygraft.peft.prompt import PrefixConfig, PromptConfig, add_prefix_tuning, add_prompt_tuning
from tinygraft.train.methods.adapter import AdapterMethod


class PromptTuning(AdapterMethod):
    """N learned embeddings before every input."""

    name = "prompt-tuning"
    changes_no_weights = True  # its modules sit beside the base weights (EWC has nothing to keep)
    label = "prompt tuning"
    summary = "learned virtual tokens before the input (--num-virtual-tokens, --prompt-init), the base frozen"
    Settings = PromptConfig
    # Lester et al. 2021 train prompts at 0.3 with Adafactor on T5; peft's examples use 3e-2 with AdamW
    default_lr = 3e-2
    from_lr = 3e-2

    @classmethod
    def settings_from_checkpoint(cls, step_dir: Path) -> PromptConfig:
        return PromptConfig(int(read_adapter_config(step_dir)["num_virtual_tokens"]), "random")

    def add(self, root: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
        s = self.settings
        ids = None
        if s.prompt_init.startswith("text:"):
            if self.base is None:
                raise TinygraftError("--prompt-init text:... reads the base model's tokenizer, and this base has none")
            ids = torch.tensor(load_tokenizer(locate(self.base)).encode(s.prompt_init[len("text:") :]))
        add_prompt_tuning(root, s.num_virtual_tokens, s.prompt_init, init_ids=ids, adapter_name=name)

    def peft_config(self, root: nn.Module) -> tuple[str, dict]:
        return CONFIG_NAME, adapter_config(root, base_model_name_or_path=self.base)


class PrefixTuning(AdapterMethod):
    """N learned keys and values before every layer's own."""

    name = "prefix-tuning"
    changes_no_weights = True
    label = "prefix tuning"
    summary = "learned keys and values before every layer's (--num-virtual-tokens, --prefix-*), the base frozen"
    Settings = PrefixConfig
    # Li & Liang 2021 use 5e-5 .. 8e-5 through the MLP on GPT-2 medium; peft's examples 1e-2 on plain prefixes
    default_lr = 1e-2
    from_lr = 1e-2

    @classmethod
    def settings_from_checkpoint(cls, step_dir: Path) -> PrefixConfig:
        c = read_adapter_config(step_dir)
        return PrefixConfig(int(c["num_virtual_tokens"]), bool(c.get("prefix_projection", False)),
                            int(c.get("encoder_hidden_size") or 512), c.get("prefix_positions", "after"))  # fmt: skip

    def add(self, root: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
        s = self.settings
        add_prefix_tuning(root, s.num_virtual_tokens, s.prefix_projection, s.prefix_hidden, s.prefix_positions,
                          adapter_name=name)  # fmt: skip

    def peft_config(self, root: nn.Module) -> tuple[str, dict]:
        return CONFIG_NAME, adapter_config(root, base_model_name_or_path=self.base)
