"""FlashAttention-3 (Hopper GPUs) for Wan transformers, through diffusers' `_flash_3` backend.

diffusers wraps FA3's forward in a torch custom op but registers no backward for it (so its
`_flash_3` backend only serves inference), and its fake (shape) function gives the log-sum-exp output
the wrong dtype and strides, which breaks `torch.compile`. `complete_op()` registers the backward
(FA3's own backward kernel) and a fake that matches the kernel, so the same op trains, compiles, and
is found by name by selective activation checkpointing (`wan_perf.save_attention_policy`).
`use_if_available(model)` also sets diffusers' process-wide active backend; `reset_diffusers_backend()` undoes it.

FA3 is not on PyPI: it is built from flash-attention's `hopper/` folder (docs/performance.md says how)
and installed as the `flash_attn_3` package, which puts `flash_attn_interface` on the path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["DIFFUSERS_BACKEND", "OP_NAMESPACE", "OP_BASENAME", "unavailable_reason", "complete_op", "use_if_available",
           "reset_diffusers_backend"]

DIFFUSERS_BACKEND = "_flash_3"
OP_NAMESPACE = "_diffusers_flash_attn_3"
OP_BASENAME = "_flash_attn_forward"


def unavailable_reason() -> str | None:
    """Why FA3 cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "FlashAttention-3 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"FlashAttention-3 runs on Hopper GPUs (H100/H200, sm_90); this GPU is sm_{major}{minor}"
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError as error:
        return f"the flash_attn_3 package is not installed ({error}); docs/performance.md says how to build it"
    from diffusers.utils import is_flash_attn_3_available

    if not is_flash_attn_3_available():
        return "flash_attn_interface imports but diffusers does not see the flash_attn_3 package (install it as a wheel)"
    return None


@functools.lru_cache(maxsize=1)
def complete_op() -> None:
    """Give diffusers' FA3 custom op a backward and a correct fake. Once per process (global)."""
    import flash_attn_interface as fa3
    from diffusers.models import attention_dispatch

    op = attention_dispatch._wrapped_flash_attn_3  # a torch.library CustomOpDef

    def fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        batch, seq, heads, _ = query.shape
        out = query.new_empty(batch, seq, heads, value.shape[-1])
        # FA3 returns an fp32 (batch, heads, seq) log-sum-exp; diffusers hands out its transpose.
        lse = query.new_empty(batch, heads, seq, dtype=torch.float32).permute(0, 2, 1)
        return out, lse

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        query, key, value, softmax_scale, causal = inputs[:5]
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.softmax_scale = query.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        ctx.causal = causal
        ctx.extra_inputs = len(inputs) - 3

    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
        # The log-sum-exp output only feeds context-parallel merging, which training here never
        # differentiates through, so its gradient is not propagated.
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        fa3._flash_attn_backward(
            grad_out, query, key, value, out, lse.permute(0, 2, 1),
            None, None, None, None, None, None,  # no variable-length batches
            dq, dk, dv, ctx.softmax_scale, ctx.causal,
        )
        return (dq, dk, dv) + (None,) * ctx.extra_inputs

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    logger.info("FlashAttention-3: backward and fake registered for diffusers' %s op", OP_BASENAME)


def use_if_available(model: torch.nn.Module) -> str | None:
    """Route every attention of a diffusers model through FA3; returns None, or why FA3 cannot run
    here (the model is then left as it was)."""
    reason = unavailable_reason()
    if reason is None:
        complete_op()
        model.set_attention_backend(DIFFUSERS_BACKEND)
    return reason


def reset_diffusers_backend() -> None:
    """diffusers' process-wide active attention backend back to its default (models built later
    would otherwise inherit FA3 from `use_if_available`)."""
    from diffusers.models.attention_dispatch import (
        DIFFUSERS_ATTN_BACKEND,
        AttentionBackendName,
        _AttentionBackendRegistry,
    )

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName(DIFFUSERS_ATTN_BACKEND))
