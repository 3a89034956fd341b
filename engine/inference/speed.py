"""Speed options of an inference worker; the defaults change nothing.

- `compile_blocks`: `torch.compile` each transformer block (diffusers' regional compilation) on CUDA.
  Same output; the first request on a model (and the first after a LoRA change) pays the compile.
- `attention`: "flash3" runs every attention through FlashAttention-3 (Hopper GPUs, installed
  separately; docs/performance.md). Elsewhere the worker logs why and keeps PyTorch's SDPA.
- `step_cache`: diffusers' First Block Cache with this threshold (0 = off). Steps whose first-block
  residual barely changed reuse the other blocks' cached residual: faster, but no longer the exact
  output of the plain pipeline (bench/RESULTS.md has speed and demo-model accuracy with and without).

Kept free of torch at import so the studio process can hold and validate them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

ATTENTION_KERNELS: tuple[str, ...] = ("default", "flash3")


@dataclass(frozen=True)
class InferenceSpeed:
    """Speed options of a worker (see the module docstring)."""

    compile_blocks: bool = False
    step_cache: float = 0.0
    attention: str = "default"

    def __post_init__(self) -> None:
        if not 0.0 <= self.step_cache < 1.0:
            raise ValueError(f"step_cache must be 0 (off) or a threshold in (0, 1) such as 0.1, got {self.step_cache}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")

    def to_argv(self) -> list[str]:
        """The worker command-line flags that recreate these options."""
        return ((["--compile-blocks"] if self.compile_blocks else [])
                + (["--step-cache", repr(self.step_cache)] if self.step_cache else [])
                + (["--attention", self.attention] if self.attention != "default" else []))


def set_step_cache(transformer: Any, threshold: float) -> None:
    """Make diffusers' First Block Cache on a transformer use `threshold` (0 = off)."""
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    if threshold:
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def flash_attention_3_installed() -> bool:
    """Whether the flash_attn_3 package (`make flash3`) is installed; found without importing it (or torch)."""
    return importlib.util.find_spec("flash_attn_3") is not None
