"""`--method ia3`: learned scaling vectors (peft/ia3.py) on keys, values and the MLP's inner activation, the base
frozen: the fewest trainable parameters of the adapter methods (two vectors of the hidden size and one of the MLP
width per layer).

Its settings are --ia3-targets and --ia3-feedforward ("auto": by the BERT or GPT-2 module names); its checkpoints
hold the vectors (+ a TaskModel's head), adapter_config.json in peft's IA3 layout and base.json (methods/adapter.py).
"""

from pathlib import Path

from torch import nn

from tinygraft.peft.adapters import DEFAULT_ADAPTER
from tinygraft.peft.files import CONFIG_NAME, adapter_config, read_adapter_config
from tinygraft.peft.ia3 import IA3Config, add_ia3
from tinygraft.train.methods.adapter import AdapterMethod


def _text(value) -> str:
    return value if isinstance(value, str) else ",".join(value)


class IA3Method(AdapterMethod):
    """IA3 vectors on the targeted layers; a TaskModel's head trains whole and is saved with them."""

    name = "ia3"
    label = "IA3"
    summary = "learned scaling vectors on keys, values and the MLP activation (--ia3-*), the base frozen"
    Settings = IA3Config
    # Liu et al. 2022 train IA3 at 3e-3 (T0 recipe); the vectors start at one and move by small relative steps
    default_lr = 3e-3
    from_lr = 3e-3

    @classmethod
    def settings_from_checkpoint(cls, step_dir: Path) -> IA3Config:
        c = read_adapter_config(step_dir)
        return IA3Config(_text(c["target_modules"]), _text(c["feedforward_modules"]))

    def add(self, root: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
        s = self.settings
        add_ia3(root, s.ia3_targets, s.ia3_feedforward, adapter_name=name)

    def peft_config(self, root: nn.Module) -> tuple[str, dict]:
        return CONFIG_NAME, adapter_config(root, base_model_name_or_path=self.base)
