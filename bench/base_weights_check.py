"""Block swap and fp8 base weights against the plain bf16 model on one training step (issue 18).

    python bench/base_weights_check.py --device cuda --preset 1.3B --frames 33 --swap 20
    python bench/base_weights_check.py --device cpu --preset tiny          # the logic, in float32

Same random weights, batch, noise and LoRA init for every variant (the trainer's path: LoRA rank 32
on the default targets, full activation checkpointing). One JSON line per variant: loss and LoRA
gradient relative to the reference, cosine, s/step (mean of the timed steps) and peak GiB allocated.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import DEFAULT_LORA_TARGETS  # noqa: E402
from engine.families.block_swap import apply_block_swap, detach_subclass_weights  # noqa: E402
from engine.families.wan import WanFamily  # noqa: E402
from engine.families.wan_random import random_transformer  # noqa: E402


def build(preset: str, device: torch.device, dtype: torch.dtype, fp8: bool, swap: int) -> torch.nn.Module:
    """Built on the host, then placed as the trainer places it (engine.families.base_weights.place)."""
    from peft import LoraConfig

    from engine.families.base_weights import quantize_frozen_linears

    model = random_transformer(preset, seed=0, dtype=dtype)
    model.requires_grad_(False)
    targets = WanFamily().lora_target_modules(model, list(DEFAULT_LORA_TARGETS))
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    if fp8:
        quantize_frozen_linears(model)
    apply_block_swap(model, swap, device)
    detach_subclass_weights(model, device)
    model.to(device)
    model.enable_gradient_checkpointing()
    return model


def step(model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(latents.device.type, enabled=False):
        out = WanFamily().forward(model, latents, torch.tensor([0.5], device=latents.device), text)
    loss = (out.float() - latents.float()).pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n])
    return loss.item(), grads


def run(preset: str, device: torch.device, frames: int, height: int, width: int, fp8: bool, swap: int,
        steps: int, reference: tuple[float, torch.Tensor] | None) -> tuple[dict, tuple[float, torch.Tensor]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(preset, device, dtype, fp8, swap)
    generator = torch.Generator().manual_seed(1)
    latent_frames = (frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator).to(device, dtype)
    text = torch.randn(1, 512, model.config.text_dim, generator=generator).to(device, dtype)
    loss, grads = step(model, latents, text)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, latents, text)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row = {"preset": preset, "clip": f"{width}x{height}x{frames}", "fp8": fp8, "blocks_to_swap": swap,
           "loss": loss, "s_per_step": sum(times) / len(times) if times else None,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if reference is not None:
        ref_loss, ref_grads = reference
        row.update(loss_rel_diff=abs(loss - ref_loss) / abs(ref_loss),
                   grad_rel_diff=((grads - ref_grads).norm() / ref_grads.norm()).item(),
                   grad_cosine=torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item())
    del model
    return row, (loss, grads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="1.3B")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--swap", type=int, default=10, help="blocks_to_swap of the swap variants")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    args = parser.parse_args()
    device = torch.device(args.device)
    shared = dict(preset=args.preset, device=device, frames=args.frames, height=args.height, width=args.width,
                  steps=args.steps)
    row, reference = run(fp8=False, swap=0, reference=None, **shared)
    print(json.dumps(row), flush=True)
    for fp8, swap in ((False, args.swap), (True, 0), (True, args.swap)):
        row, _ = run(fp8=fp8, swap=swap, reference=reference, **shared)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
