"""Where and how the frozen base weights live: fp8 storage (`model.transformer_dtype = "float8"`)
and block swap (`blocks_to_swap = N`). The trainer calls `load_device` before loading the
transformer and `place` after the LoRA adapter is in and its parameters are set up.

fp8 uses torchao's weight-only float8 (`Float8WeightOnlyConfig`: e4m3 weights with a scale per
output row, dequantised to the activations' dtype for each matmul), a maintained library rather
than kernels of our own. Only the blocks' frozen linears are stored in fp8; LoRA weights, norms,
embedders and the output head keep their dtype, and activations stay in model.dtype.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from engine.config import ConfigError, TrainConfig
from engine.families.block_swap import BlockSwapper, apply_block_swap, detach_subclass_weights

logger = logging.getLogger(__name__)

__all__ = ["load_device", "place", "quantize_frozen_linears", "fp8_unavailable_reason"]


def wants_host_load(cfg: TrainConfig) -> bool:
    return (cfg.blocks_to_swap or 0) > 0 or cfg.model.transformer_dtype == "float8"


def load_device(cfg: TrainConfig, device: torch.device) -> torch.device:
    """Load on the host when the whole model in model.dtype need never sit on the GPU (fp8, swap)."""
    return torch.device("cpu") if device.type == "cuda" and wants_host_load(cfg) else device


def place(transformer: torch.nn.Module, cfg: TrainConfig, device: torch.device,
          warn: Callable[[str], None] = logger.warning) -> BlockSwapper | None:
    """fp8-quantise and swap as configured, then put the model on `device`; `warn` gets what the
    user should know (a swap that cannot save memory)."""
    if not wants_host_load(cfg):
        return None
    if cfg.blocks_to_swap and device.type != "cuda":
        warn("blocks_to_swap: ignored on CPU (the model already lives in host memory)")
    elif cfg.blocks_to_swap and not cfg.activation_checkpointing:
        warn("blocks_to_swap: saves no GPU memory without activation_checkpointing (the forward keeps each "
             "block's weights for its backward)")
    if cfg.model.transformer_dtype == "float8":
        count = quantize_frozen_linears(transformer)
        logger.info("fp8 base weights: %d frozen linears stored in float8 (torchao)", count)
    swapper = apply_block_swap(transformer, cfg.blocks_to_swap or 0, device)
    detach_subclass_weights(transformer, device)  # the fp8 weights that are not swapped
    transformer.to(device)
    transformer._block_swapper = swapper  # wan_perf leaves swapped models uncompiled
    return swapper


def fp8_unavailable_reason() -> str | None:
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_  # noqa: F401
    except ImportError as exc:
        return f"torchao is not installed ({exc}); pip install -r requirements.txt"
    return None


def quantize_frozen_linears(transformer: torch.nn.Module) -> int:
    """Store every frozen linear weight inside the blocks in float8; returns how many."""
    reason = fp8_unavailable_reason()
    if reason:
        raise ConfigError("model.transformer_dtype", f"'float8' needs torchao: {reason}")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    chosen = set()

    def frozen_block_linear(module: torch.nn.Module, name: str) -> bool:
        ok = (isinstance(module, torch.nn.Linear) and name.startswith("blocks.") and "lora_" not in name
              and not module.weight.requires_grad)
        if ok:
            chosen.add(name)
        return ok

    quantize_(transformer, Float8WeightOnlyConfig(), filter_fn=frozen_block_linear)
    return len(chosen)
