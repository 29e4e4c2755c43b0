"""`--method houlsby` and `--method pfeiffer`: bottleneck adapters (peft/bottleneck.py) after the attention and MLP
output projections (Houlsby) or after the MLP's only (Pfeiffer), the base frozen.

Their settings are --adapter-reduction, --adapter-act and --adapter-targets ("auto": by the BERT or GPT-2 module
names); checkpoints hold the adapters (+ a TaskModel's head), adapter_config.json in our bottleneck layout (peft has
none; peft/files.py) and base.json (methods/adapter.py). Not mergeable: `export --merged` refuses in one sentence.
"""

from pathlib import Path

from torch import nn

from tinygraft.peft.adapters import DEFAULT_ADAPTER
from tinygraft.peft.bottleneck import BottleneckConfig, add_bottleneck
from tinygraft.peft.files import CONFIG_NAME, adapter_config, read_adapter_config
from tinygraft.train.methods.adapter import AdapterMethod


class Houlsby(AdapterMethod):
    """Bottleneck adapters after each block's attention and MLP output projections; a TaskModel's head trains."""

    name = "houlsby"
    changes_no_weights = True  # its modules sit beside the base weights (EWC has nothing to keep)
    label = "Houlsby"
    summary = "bottleneck adapters after attention and MLP (--adapter-*), the base frozen"
    Settings = BottleneckConfig
    # Houlsby et al. 2019 swept 3e-5 .. 3e-3 with the up-projection zero-initialised; 1e-3 is the adapters
    # library's default, a starting point not measured here yet
    default_lr = 1e-3
    from_lr = 1e-3

    @classmethod
    def settings_from_checkpoint(cls, step_dir: Path) -> BottleneckConfig:
        c = read_adapter_config(step_dir)
        targets = c["target_modules"]
        return BottleneckConfig(int(c["reduction"]), c["non_linearity"], targets if isinstance(targets, str) else
                                ",".join(targets))  # fmt: skip

    def add(self, root: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
        s = self.settings
        add_bottleneck(root, self.name, s.adapter_targets, s.adapter_reduction, s.adapter_act, adapter_name=name)

    def peft_config(self, root: nn.Module) -> tuple[str, dict]:
        return CONFIG_NAME, adapter_config(root, base_model_name_or_path=self.base)


class Pfeiffer(Houlsby):
    """Bottleneck adapters after each block's MLP only (half of Houlsby's)."""

    name = "pfeiffer"
    label = "Pfeiffer"
    summary = "bottleneck adapters after the MLP (--adapter-*), the base frozen"
