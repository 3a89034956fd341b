"""Block swap, activation offload and fp8 base weights against the plain bf16 model on one training
step (issue 18).

    python bench/base_weights_check.py --device cuda --preset 1.3B --frames 33 --swap 20
    python bench/base_weights_check.py --device cpu --preset tiny          # the logic, in float32

Same random weights, batch, noise and LoRA init for every variant (the trainer's path: LoRA rank 32
on the default targets, placed and checkpointed by the trainer's own functions). One JSON line per
variant: loss and LoRA gradient relative to the reference (bf16, full checkpointing), cosine, the
gradient's own run-to-run difference (the same step again), s/step (mean of the timed steps) and
peak GiB allocated.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import DEFAULT_LORA_TARGETS  # noqa: E402
from engine.families.wan import WanFamily  # noqa: E402
from engine.families.wan_random import random_transformer  # noqa: E402


@functools.lru_cache(maxsize=1)
def _random_base(preset: str, dtype: torch.dtype) -> torch.nn.Module:
    """The random weights every variant starts from (built once: 1.3B takes a while on the host)."""
    return random_transformer(preset, seed=0, dtype=dtype)


def build(preset: str, device: torch.device, dtype: torch.dtype, fp8: bool, swap: int,
          checkpointing: str) -> torch.nn.Module:
    """Built on the host, then placed and given its checkpointing as the trainer does
    (engine.families.base_weights.place, engine.families.wan_perf.apply)."""
    from peft import LoraConfig

    from engine.config import TrainConfig
    from engine.families.base_weights import place
    from engine.families.wan_perf import PerfOptions, apply

    model = copy.deepcopy(_random_base(preset, dtype))
    model.requires_grad_(False)
    targets = WanFamily().lora_target_modules(model, list(DEFAULT_LORA_TARGETS))
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    cfg = TrainConfig(output_dir="unused", activation_checkpointing=True, blocks_to_swap=swap or None)
    cfg = cfg.with_value("model.transformer_dtype", "float8" if fp8 else None)
    place(model, cfg, device)
    if not fp8 and not swap:
        model.to(device)  # place() leaves a plain model where it is
    apply(model, PerfOptions(checkpointing=checkpointing), activation_checkpointing=True)
    return model


def step(model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(latents.device.type, enabled=False):
        out = WanFamily().forward(model, latents, torch.tensor([0.5], device=latents.device), text)
    loss = (out.float() - latents.float()).pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n])
    return loss.item(), grads


def _relative(grads: torch.Tensor, reference: torch.Tensor) -> float:
    return ((grads - reference).norm() / reference.norm()).item()


def run(preset: str, device: torch.device, frames: int, height: int, width: int, fp8: bool, swap: int,
        checkpointing: str, steps: int,
        reference: tuple[float, torch.Tensor] | None) -> tuple[dict, tuple[float, torch.Tensor]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        gc.collect()  # the last variant's model: its hooks and block swapper form reference cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(preset, device, dtype, fp8, swap, checkpointing)
    generator = torch.Generator().manual_seed(1)
    latent_frames = (frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator).to(device, dtype)
    text = torch.randn(1, 512, model.config.text_dim, generator=generator).to(device, dtype)
    loss, grads = step(model, latents, text)
    times, last = [], grads
    for _ in range(steps):
        start = time.perf_counter()
        _, last = step(model, latents, text)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row = {"preset": preset, "clip": f"{width}x{height}x{frames}", "fp8": fp8, "blocks_to_swap": swap,
           "checkpointing": checkpointing, "loss": loss,
           "s_per_step": sum(times) / len(times) if times else None,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           # the same step again on the same model: how far the GPU's own kernels move the gradient
           "repeat_grad_rel_diff": _relative(last, grads),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if reference is not None:
        ref_loss, ref_grads = reference
        row.update(loss_rel_diff=abs(loss - ref_loss) / abs(ref_loss), grad_rel_diff=_relative(grads, ref_grads),
                   grad_cosine=torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item())
    del model
    return row, (loss, grads)


VARIANTS = ("swap", "offload", "fp8", "fp8+swap")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="1.3B")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--swap", type=int, default=10, help="blocks_to_swap of the swap variants")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="against bf16 with full checkpointing; '+' combines swap, offload and fp8")
    args = parser.parse_args()
    device = torch.device(args.device)
    shared = dict(preset=args.preset, device=device, frames=args.frames, height=args.height, width=args.width,
                  steps=args.steps)
    row, reference = run(fp8=False, swap=0, checkpointing="full", reference=None, **shared)
    print(json.dumps(row), flush=True)
    for variant in args.variants.split(","):
        parts = set(variant.split("+"))
        row, _ = run(fp8="fp8" in parts, swap=args.swap if "swap" in parts else 0,
                     checkpointing="offload" if "offload" in parts else "full", reference=reference, **shared)
        print(json.dumps({"variant": variant, **row}), flush=True)


if __name__ == "__main__":
    main()
