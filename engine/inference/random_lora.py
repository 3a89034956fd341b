"""Random LoRA files for a local Wan model (tests and benchmarks: no trained LoRA is needed).

The LoRA has non-zero B weights, so it visibly changes the output, and is saved through
`engine.lora.save_lora` in the ComfyUI key format the trainer writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.config import DEFAULT_LORA_TARGETS
from engine.lora import ADAPTER_FILE, save_lora

__all__ = ["random_lora"]


def _target_shapes(model_dir: Path, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) of the transformer's LoRA targets, built on meta."""
    from diffusers import WanTransformer3DModel

    config = json.loads((model_dir / "transformer" / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks.")
            and any(name.endswith("." + t) for t in targets)}


def random_lora(model_dir: str | Path, out_dir: str | Path, *, rank: int = 4, seed: int = 0, scale: float = 0.5,
                targets: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> Path:
    """Write a random LoRA for the Wan model at `model_dir` into `out_dir`; returns the safetensors file."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in sorted(_target_shapes(Path(model_dir), targets).items()):
        state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
        state[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * scale / rank ** 0.5
    folder = save_lora(state, out_dir, rank=rank, alpha=rank, target_modules=list(targets), dtype=torch.float32,
                       metadata={"purpose": "random test LoRA"})
    return folder / ADAPTER_FILE
