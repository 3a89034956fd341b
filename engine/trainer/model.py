"""Building what the trainer trains: the frozen transformer (or Wan2.2's pair of experts) with LoRA
injected, its base-weight placement (fp8 / block swap) and speed options, and the DeepSpeed engine."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import optimizers
from engine.config import ConfigError, TrainConfig
from engine.families import ModelFamily, base_weights
from engine.lora import peft_state_from_file, validate_lora
from engine.rundir import EXPERT_LORA_FILES
from engine.trainer.experts import HIGH_NOISE, LOW_NOISE, ExpertPairModule, ExpertPlacement, ExpertSchedule
from engine.trainer.objective import FlowMatchingModule
from engine.trainer.order import lr_factor

logger = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    module: torch.nn.Module  # what DeepSpeed wraps: the flow-matching loss over the transformer(s)
    params: list[torch.nn.Parameter]  # the LoRA weights, the only trainable ones
    transformer: torch.nn.Module  # the (first) transformer: what samples and speed options see
    saved_transformers: dict[str | None, torch.nn.Module]  # expert name (None: single model) -> transformer
    experts: ExpertSchedule | None = None  # Wan2.2 A14B with model.experts = "both"
    placement: ExpertPlacement | None = None


def build_model(cfg: TrainConfig, family: ModelFamily, model_dir: Path, device: torch.device,
                model_dtype: torch.dtype, adapter_dtype: torch.dtype, warn: Callable[[str], None]) -> BuiltModel:
    loader = _LoraLoader(cfg, family, model_dir, device, model_dtype, adapter_dtype, warn)
    experts = expert_schedule(cfg, family, model_dir)
    if experts is not None:
        return _expert_pair(cfg, family, model_dir, device, model_dtype, experts, loader)
    source = cfg.model.transformer_path or cfg.model.transformer_subfolder  # Wan2.2: one expert's folder or file
    transformer, params = loader.load(source, cfg.model.transformer_subfolder, cfg.adapter.init_from_existing, cfg.seed)
    return BuiltModel(FlowMatchingModule(transformer, family, model_dtype), params, transformer, {None: transformer})


def expert_schedule(cfg: TrainConfig, family: ModelFamily, model_dir: Path) -> ExpertSchedule | None:
    """None unless model.experts = 'both' (then the model must have two experts)."""
    m = cfg.model
    if m.experts != "both":
        return None
    info = family.describe(model_dir)
    if len(getattr(info, "transformers", ())) != 2:
        raise ConfigError("model.experts", f"'both' needs a model with two experts (transformer and "
                                           f"transformer_2); {model_dir} has {len(info.transformers)}")
    boundary = m.boundary_ratio if m.boundary_ratio is not None else info.boundary_ratio
    if boundary is None:
        raise ConfigError("model.boundary_ratio", f"{model_dir}/model_index.json has no boundary_ratio; set one")
    if not m.min_t < boundary < m.max_t:
        raise ConfigError("model.boundary_ratio", f"{boundary} must lie strictly between min_t and max_t")
    schedule = ExpertSchedule.from_config(cfg, boundary)
    logger.info("two experts: boundary %.3f, high-noise expert trained on %.1f%% of steps",
                boundary, 100 * schedule.p_high)
    return schedule


def _expert_pair(cfg: TrainConfig, family: ModelFamily, model_dir: Path, device: torch.device,
                 model_dtype: torch.dtype, experts: ExpertSchedule, loader: "_LoraLoader") -> BuiltModel:
    init = _expert_init_files(cfg.adapter.init_from_existing)
    high, high_params = loader.load("transformer", "transformer", init[HIGH_NOISE], cfg.seed)
    low, low_params = loader.load("transformer_2", "transformer_2", init[LOW_NOISE], cfg.seed + 1)
    saved = {HIGH_NOISE: high, LOW_NOISE: low}
    placement = ExpertPlacement(saved, device, offload=cfg.model.idle_expert != "resident")
    module = ExpertPairModule(high, low, family, model_dtype, experts.boundary)
    return BuiltModel(module, high_params + low_params, high, saved, experts, placement)


@dataclass
class _LoraLoader:
    cfg: TrainConfig
    family: ModelFamily
    model_dir: Path
    device: torch.device
    model_dtype: torch.dtype
    adapter_dtype: torch.dtype
    warn: Callable[[str], None]

    def load(self, source: str, config_subfolder: str, init_from: str | None,
             seed: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        from peft import LoraConfig, set_peft_model_state_dict

        cfg, family = self.cfg, self.family
        transformer = family.load_transformer(self.model_dir, source, base_weights.load_device(cfg, self.device),
                                              self.model_dtype, config_subfolder)
        targets = family.lora_target_modules(transformer, cfg.adapter.target_modules)
        torch.manual_seed(seed)  # identical LoRA init on every rank and every resume
        transformer.add_adapter(LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.lora_alpha,
                                           lora_dropout=cfg.adapter.dropout, target_modules=targets,
                                           init_lora_weights=True))
        if init_from:
            info = family.describe(self.model_dir)
            validate_lora(init_from, family.name, num_blocks=info.num_blocks)
            state = peft_state_from_file(init_from, rank=cfg.adapter.rank, alpha=cfg.lora_alpha)
            result = set_peft_model_state_dict(transformer, state)
            missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if missing:
                raise ValueError(f"adapter.init_from_existing: {len(missing)} LoRA weights do not match this "
                                 f"model/targets (e.g. {missing[0]})")
        params = []
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(self.adapter_dtype)
                param.requires_grad_(True)
                params.append(param)
        base_weights.place(transformer, cfg, self.device, self.warn)  # fp8 / block swap ([model], blocks_to_swap)
        if cfg.activation_checkpointing:
            family.enable_activation_checkpointing(transformer)
        if family.name == "wan":  # speed options ([performance]); defaults change nothing
            from engine.families.wan_perf import PerfOptions, apply as apply_performance

            apply_performance(transformer, PerfOptions.from_config(cfg.performance),
                              activation_checkpointing=cfg.activation_checkpointing)
        return transformer, params


def _param_groups(cfg: TrainConfig, module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list:
    """The LoRA weights as one group, or with LoRA+ (arXiv 2402.12354) two: the B matrices (zero at the start,
    they carry what the adapter adds) at `loraplus_lr_ratio` times the A matrices' lr."""
    ratio = cfg.optimizer.loraplus_lr_ratio
    if not ratio or ratio == 1:
        return params
    b_ids = {id(p) for name, p in module.named_parameters() if ".lora_B." in name}
    return [{"params": [p for p in params if id(p) not in b_ids]},
            {"params": [p for p in params if id(p) in b_ids], "lr": cfg.optimizer.lr * ratio}]


def build_engine(cfg: TrainConfig, module: torch.nn.Module, params: list[torch.nn.Parameter], total_steps: int,
                 on_cpu: bool) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR]:
    import deepspeed

    optimizer = optimizers.build(cfg.optimizer, _param_groups(cfg, module, params), on_cpu=on_cpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                               schedule=cfg.lr_scheduler),
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        # Without ZeRO the trainer clips the LoRA gradients itself (`_clip_lora_grads`): one
        # fused pass that also yields the norm it reports, instead of DeepSpeed's per-tensor one.
        "gradient_clipping": cfg.gradient_clipping if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The frozen base keeps its own dtype; the LoRA weights and optimizer stay in adapter dtype.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    if cfg.zero_stage > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine, scheduler


def _expert_init_files(path: str | None) -> dict[str, str | None]:
    """init_from_existing for two experts: a save folder or a high-noise file gives both of a pair;
    a single file (e.g. a Wan2.1 LoRA) starts both experts."""
    from engine.lora import expert_partner

    if not path:
        return {HIGH_NOISE: None, LOW_NOISE: None}
    high = Path(path)
    if high.is_dir() and (high / EXPERT_LORA_FILES[HIGH_NOISE]).is_file():
        high = high / EXPERT_LORA_FILES[HIGH_NOISE]
    low = expert_partner(high) if high.is_file() else None
    return {HIGH_NOISE: str(high), LOW_NOISE: str(low or high)}
