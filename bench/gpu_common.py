"""Shared pieces of the GPU benches: work counting (MFU), real-shape random Wan transformers,
timing and one-JSON-line output. Importable without a GPU (the tests use the counting)."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # first, always: bench/engine.py must not shadow the engine package

# Dense bf16 peak of an H100 SXM and an H200 (same chip), as REFERENCE.md counts MFU.
PEAK_BF16_FLOPS = 989e12
TEXT_TOKENS = 512
VAE_STRIDE_T, VAE_STRIDE_S, PATCH_S = 4, 8, 2


@dataclass(frozen=True)
class WanShape:
    dim: int
    ffn: int
    layers: int


SHAPES = {"1.3B": WanShape(1536, 8960, 30), "14B": WanShape(5120, 13824, 40)}


def video_tokens(height: int, width: int, frames: int) -> int:
    """Transformer tokens of one clip: 480x832x81 -> 21 x 30 x 52 = 32,760."""
    latent_frames = (frames - 1) // VAE_STRIDE_T + 1
    return latent_frames * (height // VAE_STRIDE_S // PATCH_S) * (width // VAE_STRIDE_S // PATCH_S)


def block_flops(tokens: int, dim: int, ffn: int, text: int = TEXT_TOKENS) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of one Wan block, as REFERENCE.md counts them."""
    linear = 12 * tokens * dim**2 + 4 * tokens * dim * ffn + 4 * text * dim**2
    attention = 4 * tokens**2 * dim + 4 * tokens * text * dim
    return float(linear), float(attention)


def lora_step_flops(preset: str, tokens: int) -> float:
    """Useful FLOPs of one LoRA training step at batch 1 (frozen linears: no weight gradients;
    attention backward ~2x forward). Recompute from checkpointing is NOT counted."""
    s = SHAPES[preset]
    lin, att = block_flops(tokens, s.dim, s.ffn)
    return s.layers * (2 * lin + 3 * att)


def forward_flops(preset: str, tokens: int) -> float:
    s = SHAPES[preset]
    lin, att = block_flops(tokens, s.dim, s.ffn)
    return s.layers * (lin + att)


def mfu(flops: float, seconds: float, peak: float = PEAK_BF16_FLOPS) -> float:
    return flops / seconds / peak


# ---- device facts ---------------------------------------------------------------------------
def card_name() -> str:
    """'H100' / 'H200' / the device name as reported."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    for short in ("H200", "H100", "A100", "L40S"):
        if short in name:
            return short
    return name


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def emit(record: dict[str, Any], out: Path | None = None) -> None:
    """One JSON line on stdout (and appended to `out`)."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# ---- models -------------------------------------------------------------------------------
def real_shape_transformer(preset: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A random-weight WanTransformer3DModel of a real shape, with the dtype layout that
    `from_pretrained(torch_dtype=bf16)` gives (rope, norms, time embedder, modulation in fp32).

    Built directly on the device in the target dtype: seconds, and no fp32 copy of 14B weights.
    """
    from diffusers import WanTransformer3DModel

    from engine.families.wan_random import transformer_config

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**transformer_config(preset))
    finally:
        torch.set_default_dtype(previous)
    keep = set(getattr(model, "_keep_in_fp32_modules", []) or [])
    for name, module in model.named_modules():
        if name and name.split(".")[-1] in keep:
            module.to(torch.float32)
    model.requires_grad_(False)
    return model


# ---- timing --------------------------------------------------------------------------------
@dataclass
class Timing:
    step_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.step_s)

    @property
    def spread(self) -> float:
        return (max(self.step_s) - min(self.step_s)) if self.step_s else 0.0


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> tuple[Timing, float]:
    """Run `warmup` untimed then `steps` timed calls (synchronised host clock around each).
    Returns the timing and the seconds the warmup took (compile time shows there)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return Timing(times), warm_s
