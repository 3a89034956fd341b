"""Speed options for Wan transformers: attention backend, compiled blocks, selective checkpointing.

The trainer calls `apply(transformer, options, activation_checkpointing=...)` once, after the LoRA
adapter is injected and before the optimizer / DeepSpeed engine is built. Every option has a safe
default that changes nothing, so a machine without a GPU (tests, CPU demo runs) behaves as before.

Why these options (numbers in bench/RESULTS.md):
- At 480x832x81 a Wan block spends most of its work in self-attention over 32,760 tokens, so the
  attention kernel matters most. PyTorch's default order tries FlashAttention-2 first; on Hopper
  cuDNN's fused attention is faster. `attention_backend = "cudnn"` moves it to the front, and
  `"flash3"` routes the model's attention through FlashAttention-3 (faster still on Hopper; a
  separately built package, engine/families/flash3.py).
- Full activation checkpointing recomputes the whole block, attention included, in backward.
  `checkpointing = "save_attention"` keeps the self-attention outputs (about T x dim bf16 per block)
  and recomputes only the cheap linears, norms and RoPE. `checkpointing = "offload"` recomputes
  whole blocks and keeps their inputs in pinned host memory (torch's `save_on_cpu`): for cards
  where even the kept block inputs do not fit (issue 18).
- `compile_blocks` compiles each block (or the checkpointed block), fusing Wan's many fp32
  elementwise steps (norm + modulation + gated residual) into few kernels.
- With fp32 LoRA weights, peft casts every LoRA input (up to tokens x 8960) to fp32 and runs the
  LoRA matmuls in fp32. `lora_compute_dtype = "activation"` runs them in the activations' dtype
  (bf16) from a cast of the weights, so the weights and the optimizer state stay fp32.
"""

from __future__ import annotations

import functools
import logging
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.config import AttentionBackend, CheckpointPolicyName, LoraComputeDtype
from engine.config import PerformanceConfig as PerfOptions  # one definition: the [performance] table
from engine.families import flash3

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
    "LORA_COMPUTE_DTYPES",
    "lora_in_activation_dtype",
]

ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)
CHECKPOINT_POLICIES: tuple[str, ...] = typing.get_args(CheckpointPolicyName)
LORA_COMPUTE_DTYPES: tuple[str, ...] = typing.get_args(LoraComputeDtype)

# aten ops that compute fused attention; their outputs are what `save_attention` keeps.
_ATTENTION_OP_NAMES = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention_for_cpu",
    flash3.OP_BASENAME,
)


@dataclass
class AppliedPerf:
    """What `apply` actually did (falls back are logged and recorded here)."""

    attention_backend: str
    compiled: str  # "none" | "blocks" | "checkpointed_blocks"
    checkpointing: str  # "off" | "full" | "save_attention"
    notes: list[str]
    lora_layers_in_activation_dtype: int = 0


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
    "default" restores PyTorch's own order (which, since cuDNN 9.15 on Hopper, already puts cuDNN
    first). Returns the backend in effect ("default" when the request cannot be met here).
    """
    if name == "default":
        reset_attention_backend()
        return "default"
    if name == "flash3":
        raise ValueError("flash3 is not an SDPA backend: it is set per model by wan_perf.apply")
    if not torch.cuda.is_available():
        logger.info("attention_backend=%s needs CUDA; keeping PyTorch's default", name)
        return "default"
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        logger.warning("attention_backend=cudnn: cuDNN is not available; keeping PyTorch's default")
        return "default"
    from torch.nn.attention import SDPBackend

    first = _sdp_backend(name)
    _default_sdp_order()  # record PyTorch's own order before changing it
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if b != first]
    _set_sdp_order([int(b) for b in order])
    return name


def reset_attention_backend() -> None:
    """Back to PyTorch's own order with every backend enabled, and diffusers' default backend."""
    _set_sdp_order(list(_default_sdp_order()))
    flash3.reset_diffusers_backend()


@functools.lru_cache(maxsize=1)
def _default_sdp_order() -> tuple[int, ...]:
    """PyTorch's own SDPA order in this process.

    PyTorch picks its default lazily, at the first CUDA attention call (cuDNN first on Hopper with
    a recent cuDNN), and would then overwrite an order set earlier: run one tiny call first.
    """
    if torch.cuda.is_available():
        with torch.no_grad():
            q = torch.zeros(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    getter = getattr(torch._C, "_get_sdp_priority_order", None)
    return tuple(int(b) for b in getter()) if getter is not None else ()


def _set_sdp_order(order: list[int]) -> None:
    """Enable the backends in `order` (all four when it is empty) and make it the priority order."""
    from torch.nn.attention import SDPBackend

    every = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION)
    enabled = {int(b) for b in order} or {int(b) for b in every}
    torch.backends.cuda.enable_flash_sdp(int(SDPBackend.FLASH_ATTENTION) in enabled)
    torch.backends.cuda.enable_mem_efficient_sdp(int(SDPBackend.EFFICIENT_ATTENTION) in enabled)
    torch.backends.cuda.enable_math_sdp(int(SDPBackend.MATH) in enabled)
    torch.backends.cuda.enable_cudnn_sdp(int(SDPBackend.CUDNN_ATTENTION) in enabled)
    setter = getattr(torch._C, "_set_sdp_priority_order", None)
    if setter is None or not order:  # older PyTorch: enabling flags is all we can do
        return
    current = [int(b) for b in torch._C._get_sdp_priority_order()]
    setter(order + [b for b in current if b not in order])


def _route_attention(transformer: torch.nn.Module, name: str, notes: list[str]) -> str:
    """Pick the attention kernel for `transformer`; returns the one in effect (notes say why not)."""
    if name == "flash3":
        reset_attention_backend()  # PyTorch's order for anything FA3 does not cover
        reason = flash3.use_if_available(transformer)
        if reason is None:
            return "flash3"
        fallback = set_attention_backend("cudnn")
        notes.append(f"attention_backend flash3 unavailable ({reason}); using {fallback}")
        return fallback
    flash3.reset_diffusers_backend()  # a model built after a flash3 one must not inherit FA3
    backend = set_attention_backend(name)
    if backend != name:
        notes.append(f"attention_backend {name} unavailable, using default")
    return backend


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
    seq_dim = -3 if base == flash3.OP_BASENAME else -2  # FA3 takes (batch, seq, heads, dim)
    return hasattr(query, "shape") and hasattr(key, "shape") and query.shape[seq_dim] == key.shape[seq_dim]


def _checkpoint_fn(policy: str) -> Callable[..., Any]:
    """A diffusers `gradient_checkpointing_func(block, *args)` for the given policy."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if policy == "full":
        def full(block: torch.nn.Module, *args: Any) -> Any:
            return checkpoint(block.__call__, *args, use_reentrant=False)

        return full
    if policy == "offload":
        # Only what the checkpoint itself keeps (the block's inputs) meets these hooks: inside the block
        # the checkpoint's own hooks take over. So the block inputs wait in pinned host memory (copied
        # back for the recompute) and the GPU holds one block's working set.
        def offload(block: torch.nn.Module, *args: Any) -> Any:
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return checkpoint(block.__call__, *args, use_reentrant=False)

        return offload

    context_fn = functools.partial(create_selective_checkpoint_contexts, save_attention_policy)

    def selective(block: torch.nn.Module, *args: Any) -> Any:
        return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=context_fn)

    return selective


# ---- LoRA matmuls in the activations' dtype ---------------------------------------------------------
class _ActivationDtypeLinear(torch.nn.Linear):
    """An nn.Linear that multiplies in its input's dtype: the parameter (fp32 master) is cast for
    the matmul and receives an fp32 gradient through the cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


def lora_in_activation_dtype(model: torch.nn.Module) -> int:
    """Make every peft LoRA linear in `model` compute in the activations' dtype; returns how many.

    peft would cast the layer input to the LoRA weight dtype (fp32) first: a full copy of each
    input at 2x its size, then fp32 matmuls. State-dict keys and parameters are unchanged.
    """
    changed = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        module.cast_input_dtype_enabled = False
        for sub in list(lora_a.values()) + list(lora_b.values()):
            if type(sub) is torch.nn.Linear:
                sub.__class__ = _ActivationDtypeLinear
        changed += 1
    return changed


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
    backend = _route_attention(transformer, options.attention_backend, notes)

    on_gpu = any(p.is_cuda for p in transformer.parameters())
    compile_wanted = options.compile_blocks
    if compile_wanted and not on_gpu:
        notes.append("compile_blocks ignored: model is not on a GPU")
        compile_wanted = False
    if compile_wanted and getattr(transformer, "_block_swapper", None) is not None:
        notes.append("compile_blocks ignored: blocks_to_swap swaps the blocks' weights between steps")
        compile_wanted = False

    blocks = _blocks(transformer)
    lora_layers = 0
    if options.lora_compute_dtype == "activation":
        lora_layers = lora_in_activation_dtype(transformer)
        if lora_layers == 0:
            notes.append("lora_compute_dtype=activation: no LoRA layers found (apply after adding the adapter)")
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
    return AppliedPerf(attention_backend=backend, compiled=compiled, checkpointing=checkpointing, notes=notes,
                       lora_layers_in_activation_dtype=lora_layers)
