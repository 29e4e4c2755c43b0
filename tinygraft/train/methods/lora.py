"""`--method lora` and `--method dora`: low-rank adapters (peft/lora.py) on the backbone's linear layers, the base
frozen; DoRA with a learned magnitude per output over LoRA's updated direction.

Its settings are peft's LoRAConfig (--lora-r, --lora-alpha, --lora-dropout, --lora-targets, --lora-rslora); its
checkpoints hold the adapter (+ a TaskModel's head), adapter_config.json in peft's layout and base.json
(methods/adapter.py says how the base is found again and checked).

    method = LoRAMethod(LoRAConfig(r=8, alpha=16, targets="c_attn,c_proj"), base="models/gpt2")
    method = LoRAMethod.from_checkpoint("runs/lora/checkpoints/step-00000300")   # to resume or export: base checked
"""

from pathlib import Path

from torch import nn

from tinygraft.peft.adapters import DEFAULT_ADAPTER
from tinygraft.peft.files import CONFIG_NAME, adapter_config, read_adapter_config
from tinygraft.peft.lora import LoRAConfig, add_lora_config, lora_layers
from tinygraft.train.methods.adapter import AdapterMethod


class LoRAMethod(AdapterMethod):
    """Low-rank adapters on the targeted linear layers; a TaskModel's head trains whole and is saved with them."""

    name = "lora"
    label = "LoRA"
    summary = "low-rank adapters on the backbone's linear layers (--lora-*), the base frozen"
    Settings = LoRAConfig
    # LoRA's B starts at zero: at full fine-tuning's rate one epoch of SST-2 leaves it under-trained (issue 9: peft
    # LoRA at 5e-4 for one epoch, 0.759 against full's 0.822); the LoRA paper uses larger rates for the same reason
    default_lr = 1e-3
    from_lr = 1e-3

    @classmethod
    def settings_from_checkpoint(cls, step_dir: Path) -> LoRAConfig:
        c = read_adapter_config(step_dir)
        targets = c["target_modules"]
        return LoRAConfig(
            int(c["r"]),
            float(c["lora_alpha"]),
            float(c["lora_dropout"]),
            targets if isinstance(targets, str) else ",".join(targets),
            bool(c.get("use_rslora", False)),
            bool(c.get("use_dora", False)),
            "pissa" if c.get("init_lora_weights") == "pissa" else "default",
        )

    def add(self, root: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
        add_lora_config(root, self.settings, adapter_name=name)

    def peft_config(self, root: nn.Module) -> tuple[str, dict]:
        return CONFIG_NAME, adapter_config(root, base_model_name_or_path=self.base)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """LoRA+ (`--lora-plus-ratio` k): the B matrices in their own group at k times the rate of the rest."""
        groups = super().param_groups(model)
        ratio = self.settings.lora_plus_ratio
        if ratio == 1.0:
            return groups
        b = {id(layer.lora_B[n].weight) for _, layer in lora_layers(self.root(model)) for n in layer.lora_B}
        adapter = groups[0]
        rest = [p for p in adapter["params"] if id(p) not in b]
        b_params = [p for p in adapter["params"] if id(p) in b]
        return [{**adapter, "params": rest}, {"params": b_params, "lr_scale": ratio, "name": f"{self.name}_B"},
                *groups[1:]]  # fmt: skip

    def describe(self) -> dict:
        return {**super().describe(), "scaling": self.settings.scaling}


class DoRAMethod(LoRAMethod):
    """DoRA: LoRA's update as a direction, with a learned magnitude per output (the LoRA flags apply)."""

    name = "dora"
    label = "DoRA"
    summary = "LoRA with a learned magnitude per output over the updated direction (--lora-*), the base frozen"
    # Liu et al. 2024 train DoRA at LoRA's rates (their commonsense runs: LoRA's 2e-4 .. 3e-4 at larger scale)
    default_lr = 1e-3
    from_lr = 1e-3

    @classmethod
    def settings_from_name(cls, name: str) -> dict | None:
        return {"use_dora": True} if name == cls.name else None
