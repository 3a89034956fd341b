"""LoRA+ ([optimizer] loraplus_lr_ratio): the B matrices of the LoRA get ratio x lr in their own optimizer
group, the A matrices keep lr; without the key (or at 1) the optimizer has one group, as before."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from engine import optimizers
from engine.config import ConfigError, TrainConfig
from engine.trainer.model import _param_groups


def lora_module() -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    module = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), module)
    return module, [p for name, p in module.named_parameters() if "lora_" in name]


def optimizer_for(extra: str) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    cfg = TrainConfig.from_toml_string(f'output_dir = "o"\n[optimizer]\nlr = 1e-3\n{extra}')
    module, params = lora_module()
    return optimizers.build(cfg.optimizer, _param_groups(cfg, module, params), on_cpu=True), module


def test_loraplus_puts_the_b_matrices_in_a_group_at_ratio_times_lr() -> None:
    optimizer, module = optimizer_for("loraplus_lr_ratio = 16\n")
    names = {id(p): name for name, p in module.named_parameters()}
    a_group, b_group = optimizer.param_groups
    assert a_group["lr"] == pytest.approx(1e-3) and b_group["lr"] == pytest.approx(16e-3)
    assert all(".lora_A." in names[id(p)] for p in a_group["params"]) and len(a_group["params"]) == 2
    assert all(".lora_B." in names[id(p)] for p in b_group["params"]) and len(b_group["params"]) == 2
    # the schedule scales both groups from their own lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert scheduler.get_last_lr() == pytest.approx([0.5e-3, 8e-3])


@pytest.mark.parametrize("extra", ["", "loraplus_lr_ratio = 1\n"])
def test_without_loraplus_one_group_at_lr(extra: str) -> None:
    optimizer, _ = optimizer_for(extra)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert len(optimizer.param_groups[0]["params"]) == 4


def test_a_ratio_below_one_is_refused_with_its_key() -> None:
    with pytest.raises(ConfigError, match="optimizer.loraplus_lr_ratio: must be >= 1"):
        TrainConfig.from_toml_string('output_dir = "o"\n[optimizer]\nloraplus_lr_ratio = 0.5\n').validate()
