"""Speed options for Wan transformers: attention backend, compiled blocks, selective checkpointing.

The trainer calls `apply(transformer, options, activation_checkpointing=...)` once, after the LoRA
adapter is injected and before the optimizer / DeepSpeed engine is built. Every option has a safe
default that changes nothing, so a machine without a GPU (tests, CPU demo runs) behaves as before.

Why these options (numbers in bench/RESULTS.md):
- At 480x832x81 a Wan block spends most of its work in self-attention over 32,760 tokens, so the
  attention kernel matters most. PyTorch's default order tries FlashAttention-2 first; on Hopper
  cuDNN's fused attention is faster. `attention_backend = "cudnn"` moves it to the front.
- Full activation checkpointing recomputes the whole block, attention included, in backward.
  `checkpointing = "save_attention"` keeps the self-attention outputs (about T x dim bf16 per block)
  and recomputes only the cheap linears, norms and RoPE.
- `compile_blocks` compiles each block (or the checkpointed block), fusing Wan's many fp32
  elementwise steps (norm + modulation + gated residual) into few kernels.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionBackend",
    "CheckpointPolicyName",
    "PerfOptions",
    "AppliedPerf",
    "apply",
    "set_attention_backend",
    "reset_attention_backend",
    "save_attention_policy",
    "ATTENTION_BACKENDS",
    "CHECKPOINT_POLICIES",
]

AttentionBackend = Literal["default", "cudnn", "flash", "efficient"]
CheckpointPolicyName = Literal["full", "save_attention"]

ATTENTION_BACKENDS: tuple[str, ...] = ("default", "cudnn", "flash", "efficient")
CHECKPOINT_POLICIES: tuple[str, ...] = ("full", "save_attention")

# aten ops that compute fused attention; their outputs are what `save_attention` keeps.
_ATTENTION_OP_NAMES = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention_for_cpu",
)


@dataclass(frozen=True)
class PerfOptions:
    """What `apply` does; mirrors the `[performance]` config table."""

    attention_backend: AttentionBackend = "default"
    compile_blocks: bool = False
    checkpointing: CheckpointPolicyName = "full"

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"performance.attention_backend: {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.checkpointing not in CHECKPOINT_POLICIES:
            raise ValueError(
                f"performance.checkpointing: {self.checkpointing!r} is not one of {', '.join(CHECKPOINT_POLICIES)}"
            )

    @classmethod
    def from_config(cls, section: Any | None) -> "PerfOptions":
        """From a `[performance]` dataclass, a dict, or None (all defaults)."""
        if section is None:
            return cls()
        if isinstance(section, dict):
            get = section.get
        else:
            def get(key: str, default: Any = None) -> Any:
                return getattr(section, key, default)
        return cls(
            attention_backend=get("attention_backend", "default"),
            compile_blocks=bool(get("compile_blocks", False)),
            checkpointing=get("checkpointing", "full"),
        )


@dataclass
class AppliedPerf:
    """What `apply` actually did (falls back are logged and recorded here)."""

    attention_backend: str
    compiled: str  # "none" | "blocks" | "checkpointed_blocks"
    checkpointing: str  # "off" | "full" | "save_attention"
    notes: list[str]


# ---- attention ---------------------------------------------------------------------------------
def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def set_attention_backend(name: str) -> str:
    """Put one SDPA backend first in PyTorch's (process-wide) order; the others stay as fallbacks.

    A global order, rather than a context manager around each call, also holds inside compiled
    graphs and in the recompute that activation checkpointing runs during backward.
    Returns the backend in effect ("default" when the request cannot be met here).
    """
    if name == "default":
        reset_attention_backend()
        return "default"
    if not torch.cuda.is_available():
        logger.info("attention_backend=%s needs CUDA; keeping PyTorch's default", name)
        return "default"
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        logger.warning("attention_backend=cudnn: cuDNN is not available; keeping PyTorch's default")
        return "default"
    from torch.nn.attention import SDPBackend

    first = _sdp_backend(name)
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if b != first]
    _set_sdp_order(order)
    return name


def reset_attention_backend() -> None:
    """Back to PyTorch's own order with every backend enabled."""
    from torch.nn.attention import SDPBackend

    _set_sdp_order([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                    SDPBackend.CUDNN_ATTENTION])


def _set_sdp_order(order: list) -> None:
    for flag, backend in (
        (torch.backends.cuda.enable_flash_sdp, "FLASH_ATTENTION"),
        (torch.backends.cuda.enable_mem_efficient_sdp, "EFFICIENT_ATTENTION"),
        (torch.backends.cuda.enable_math_sdp, "MATH"),
        (torch.backends.cuda.enable_cudnn_sdp, "CUDNN_ATTENTION"),
    ):
        flag(any(b.name == backend for b in order))
    setter = getattr(torch._C, "_set_sdp_priority_order", None)
    if setter is None:  # older PyTorch: enabling flags is all we can do
        return
    current = list(torch._C._get_sdp_priority_order())
    wanted = [int(b) for b in order]
    setter(wanted + [b for b in current if b not in wanted])


# ---- checkpointing ------------------------------------------------------------------------------
def save_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any):
    """Selective checkpointing: keep self-attention outputs, recompute everything else.

    Cross-attention (512 text keys) is cheap to recompute, so only attention whose key length equals
    its query length is kept.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if _is_self_attention_op(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _is_self_attention_op(op: Any, args: tuple) -> bool:
    name = getattr(op, "__name__", "") or str(op)
    base = name.split(".")[0]
    if base not in _ATTENTION_OP_NAMES or len(args) < 2:
        return False
    query, key = args[0], args[1]
    return hasattr(query, "shape") and hasattr(key, "shape") and query.shape[-2] == key.shape[-2]


def _checkpoint_fn(policy: str) -> Callable[..., Any]:
    """A diffusers `gradient_checkpointing_func(block, *args)` for the given policy."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if policy == "full":
        def full(block: torch.nn.Module, *args: Any) -> Any:
            return checkpoint(block.__call__, *args, use_reentrant=False)

        return full

    context_fn = functools.partial(create_selective_checkpoint_contexts, save_attention_policy)

    def selective(block: torch.nn.Module, *args: Any) -> Any:
        return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=context_fn)

    return selective


# ---- compile -----------------------------------------------------------------------------------
def _raise_recompile_limit(blocks: int) -> None:
    """Each block is one more guard set on the same code; let all of them stay compiled."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key) and getattr(cfg, key) < blocks + 8:
            setattr(cfg, key, blocks + 8)
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4 * blocks:
        cfg.accumulated_recompile_limit = 4 * blocks


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise ValueError("wan_perf.apply expects a Wan transformer with a `blocks` list")
    return list(blocks)


# ---- the one entry point -----------------------------------------------------------------------
def apply(transformer: torch.nn.Module, options: PerfOptions, *, activation_checkpointing: bool) -> AppliedPerf:
    """Apply `options` to a (LoRA-injected) Wan transformer in place; returns what was done.

    Call before the optimizer / DeepSpeed engine is built and before the first forward.
    `activation_checkpointing` is the trainer's switch; `options.checkpointing` picks how.
    """
    notes: list[str] = []
    backend = set_attention_backend(options.attention_backend)
    if backend != options.attention_backend:
        notes.append(f"attention_backend {options.attention_backend} unavailable, using default")

    on_gpu = any(p.is_cuda for p in transformer.parameters())
    compile_wanted = options.compile_blocks
    if compile_wanted and not on_gpu:
        notes.append("compile_blocks ignored: model is not on a GPU")
        compile_wanted = False

    blocks = _blocks(transformer)
    checkpointing = "off"
    compiled = "none"
    if activation_checkpointing:
        checkpointing = options.checkpointing
        func = _checkpoint_fn(options.checkpointing)
        if compile_wanted and options.checkpointing == "save_attention":
            # Selective checkpointing must be traced together with the block: compile the
            # checkpointed call, not the block inside it.
            _raise_recompile_limit(len(blocks))
            func = torch.compile(func)
            compiled = "checkpointed_blocks"
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=func)
    if compile_wanted and compiled == "none":
        _raise_recompile_limit(len(blocks))
        for block in blocks:
            block.compile()
        compiled = "blocks"
    for note in notes:
        logger.warning(note)
    logger.info("performance: attention=%s compiled=%s checkpointing=%s", backend, compiled, checkpointing)
    return AppliedPerf(attention_backend=backend, compiled=compiled, checkpointing=checkpointing, notes=notes)
