"""Block swap (`blocks_to_swap = N`, diffusion-pipe's name): the frozen linear weights of the last N
transformer blocks live in pinned host memory; a block's weights are copied to the GPU on a side
stream one block ahead of use, and dropped again when a later block needs the room.

How it stays correct whatever the timing:
- A swapped weight is no `nn.Parameter` any more but a plain attribute (`linear.weight = tensor`),
  so `module.to(device)` (DeepSpeed moves the whole model) leaves it where it is, and swapping it
  is an attribute assignment. A copy still referenced by autograd stays alive until backward is
  done with it: evicting can only cost memory, never give a wrong result. With activation
  checkpointing the forward keeps no weight, so at most two swapped blocks are on the GPU at once
  (the block in use and the one being copied).
- The main stream waits for a block's copy event before using it, and copies made on the side
  stream are `record_stream`ed on the main stream so the allocator does not hand their memory to
  the next copy while a kernel still reads it.
- Direction: a forward pre-hook copies the next swapped block in forward order; a hook on the
  block's output gradient (backward reaches the block) copies the previous one. Inside backward
  (the recompute of a checkpointed block) the pre-hook prefetches backwards too.

On a CPU device the trainer does not swap (nothing to save). `BlockSwapper(..., device="cpu")`
still runs the whole logic with plain copies, which is how the tests check it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["BlockSwapper", "apply_block_swap", "detach_subclass_weights", "swapped_block_indices"]


def swapped_block_indices(num_blocks: int, blocks_to_swap: int) -> list[int]:
    """The last N blocks: in backward they come first, when the forward's blocks are already gone."""
    n = max(0, min(blocks_to_swap, num_blocks))
    return list(range(num_blocks - n, num_blocks))


def _frozen_linears(block: torch.nn.Module) -> list[torch.nn.Linear]:
    """Linears whose weight is frozen (base layers; LoRA A/B are trained and stay on the device)."""
    return [m for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and not m.weight.requires_grad]


def _map_tensor(tensor: torch.Tensor, fn: Any) -> torch.Tensor:
    """Apply `fn` to a tensor, or to the inner tensors of a wrapper subclass (torchao's Float8Tensor)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return fn(tensor.detach())
    names, context = flatten()
    inner = {name: _map_tensor(getattr(tensor, name), fn) for name in names}
    return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return [tensor]
    names, _ = flatten()
    return [t for name in names for t in _inner_tensors(getattr(tensor, name))]


@dataclass
class _Block:
    index: int
    linears: list[torch.nn.Linear]
    host: list[torch.Tensor]  # pinned host copies, one per linear
    device_copies: list[torch.Tensor] | None = None
    ready: Any = None  # CUDA event of the copy (None on CPU or once waited for)


class BlockSwapper:
    def __init__(self, blocks: list[torch.nn.Module], swapped: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.order = list(swapped)
        self.blocks: dict[int, _Block] = {}
        self.log: list[tuple[str, int]] = []  # ("copy" | "use" | "drop", block), for tests and debugging
        self.max_resident = 0
        self._handles: list[Any] = []
        for index in swapped:
            linears = _frozen_linears(blocks[index])
            host = [self._to_host(lin.weight) for lin in linears]
            for lin, copy in zip(linears, host):
                del lin._parameters["weight"]  # a plain attribute from now on: module.to() leaves it alone
                lin.weight = copy
            self.blocks[index] = _Block(index, linears, host)
        for index in swapped:
            self._handles.append(blocks[index].register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(blocks[index].register_forward_hook(self._post_hook(index)))
        if self.order and self.order[0] > 0:  # the block before the first swapped one starts its copy
            first = self.order[0]
            self._handles.append(blocks[first - 1].register_forward_pre_hook(
                lambda module, args: None if _in_backward() else self.prefetch(first)))

    # ---- copies -------------------------------------------------------------------------------------
    def _to_host(self, weight: torch.Tensor) -> torch.Tensor:
        def pin(t: torch.Tensor) -> torch.Tensor:
            t = t.to("cpu")
            return t.pin_memory() if self.cuda else t.clone()

        return _map_tensor(weight, pin)

    def resident(self) -> list[int]:
        return [i for i, b in self.blocks.items() if b.device_copies is not None]

    def prefetch(self, index: int | None) -> None:
        """Start copying a block to the device (on the side stream); no-op when already there."""
        if index is None or self.blocks[index].device_copies is not None:
            return
        block = self.blocks[index]
        self.log.append(("copy", index))
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # copies after the drops before them
            with torch.cuda.stream(self.stream):
                block.device_copies = [_map_tensor(h, lambda t: t.to(self.device, non_blocking=True))
                                       for h in block.host]
                block.ready = torch.cuda.Event()
                block.ready.record(self.stream)
        else:
            block.device_copies = [_map_tensor(h, lambda t: t.clone()) for h in block.host]
        self.max_resident = max(self.max_resident, len(self.resident()))

    def ensure(self, index: int, keep: int | None = None) -> None:
        """Make block `index` usable on the main stream; drop every other swapped block but `keep`."""
        for other in self.resident():
            if other not in (index, keep):
                self._drop(other)
        self.prefetch(index)
        block = self.blocks[index]
        if block.ready is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(block.ready)
            for copy in block.device_copies:
                for inner in _inner_tensors(copy):
                    inner.record_stream(main)
            block.ready = None
        for lin, copy in zip(block.linears, block.device_copies):
            lin.weight = copy
        self.log.append(("use", index))

    def _drop(self, index: int) -> None:
        block = self.blocks[index]
        for lin, host in zip(block.linears, block.host):
            lin.weight = host
        block.device_copies, block.ready = None, None
        self.log.append(("drop", index))

    # ---- hooks ---------------------------------------------------------------------------------------
    def _neighbour(self, index: int, backward: bool) -> int | None:
        position = self.order.index(index) + (-1 if backward else 1)
        return self.order[position] if 0 <= position < len(self.order) else None

    def _pre_hook(self, index: int):
        def hook(module: torch.nn.Module, args: Any) -> None:
            backward = _in_backward()  # the recompute of a checkpointed block
            following = self._neighbour(index, backward)
            self.ensure(index, keep=following)
            self.prefetch(following)

        return hook

    def _post_hook(self, index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad and not _in_backward():
                output.register_hook(self._grad_hook(index))

        return hook

    def _grad_hook(self, index: int):
        def hook(grad: torch.Tensor) -> None:
            previous = self._neighbour(index, backward=True)
            self.ensure(index, keep=previous)
            self.prefetch(previous)

        return hook

    def remove(self) -> None:
        """Back to ordinary parameters on the device (tests, and a model reused without swap)."""
        for handle in self._handles:
            handle.remove()
        for block in self.blocks.values():
            for lin, host in zip(block.linears, block.host):
                lin.weight = torch.nn.Parameter(_map_tensor(host, lambda t: t.to(self.device)), requires_grad=False)
        self.blocks.clear()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def apply_block_swap(transformer: torch.nn.Module, blocks_to_swap: int, device: torch.device) -> BlockSwapper | None:
    """Swap the last `blocks_to_swap` blocks of a (LoRA-injected) transformer that still sits on the
    host; the caller then moves the rest with `transformer.to(device)`. None when nothing is swapped
    (no GPU: the model lives in host memory anyway)."""
    blocks = list(getattr(transformer, "blocks", []))
    swapped = swapped_block_indices(len(blocks), blocks_to_swap)
    if not swapped or device.type != "cuda":
        return None
    swapper = BlockSwapper(blocks, swapped, device)
    moved = sum(sum(t.numel() * t.element_size() for h in b.host for t in _inner_tensors(h))
                for b in swapper.blocks.values())
    logger.info("block swap: %d of %d blocks' frozen weights in pinned host memory (%.2f GiB)",
                len(swapped), len(blocks), moved / 2**30)
    return swapper


def detach_subclass_weights(model: torch.nn.Module, device: torch.device) -> int:
    """Frozen weights that are tensor subclasses (torchao's fp8) become plain attributes on `device`:
    `Module.to()` cannot swap such parameters in place (DeepSpeed moves the whole model)."""
    count = 0
    for module in model.modules():
        weight = module._parameters.get("weight") if isinstance(module, torch.nn.Linear) else None
        if weight is not None and not weight.requires_grad and _inner_tensors(weight) != [weight]:
            del module._parameters["weight"]
            module.weight = _map_tensor(weight, lambda t: t.to(device))
            count += 1
    return count
