"""Block swap and fp8 base weights on a tiny random Wan transformer (CPU): the same loss and LoRA
gradients with and without swap, the prefetch order and residency, and fp8 close to full precision."""
from __future__ import annotations

import pytest
import torch

from engine.families.block_swap import BlockSwapper, swapped_block_indices
from engine.families.wan import WanFamily
from engine.families.wan_random import random_transformer


def _lora_model(seed: int = 0, checkpointing: bool = True) -> torch.nn.Module:
    from peft import LoraConfig

    model = random_transformer("tiny", seed=seed)
    model.requires_grad_(False)
    targets = WanFamily().lora_target_modules(model, ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _step(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One loss and the LoRA gradients of a fixed batch."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 3, 8, 8, generator=generator)
    text = torch.randn(1, 12, 32, generator=generator)
    model.zero_grad(set_to_none=True)
    out = WanFamily().forward(model, latents, torch.tensor([0.4]), text)
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [True, False])
def test_block_swap_gives_the_same_loss_and_gradients(checkpointing: bool) -> None:
    reference = _step(_lora_model(checkpointing=checkpointing))
    model = _lora_model(checkpointing=checkpointing)
    swapper = BlockSwapper(list(model.blocks), swapped_block_indices(len(model.blocks), 2), "cpu")
    for _ in range(2):  # a second step starts from the residency the first one left
        loss, grads = _step(model)
        assert torch.equal(loss, reference[0]) and torch.equal(grads, reference[1])
    assert swapper.max_resident <= 2


def test_swapped_weights_are_no_parameters_and_follow_the_blocks_both_ways() -> None:
    model = _lora_model()
    blocks = list(model.blocks)
    assert swapped_block_indices(len(blocks), 5) == [0, 1] and swapped_block_indices(2, 1) == [1]
    parameters_before = {n for n, _ in model.named_parameters()}
    swapper = BlockSwapper(blocks, [0, 1], "cpu")
    after = {n for n, _ in model.named_parameters()}
    dropped = parameters_before - after
    # every frozen linear weight of both blocks left the parameters (so module.to() leaves it alone);
    # LoRA weights, biases and norms did not
    assert dropped and all(n.startswith("blocks.") and n.endswith("weight") and "lora_" not in n for n in dropped)
    assert all("lora_" not in n for n in dropped) and any("lora_" in n for n in after)
    swapper.log.clear()
    _step(model)
    uses = [i for kind, i in swapper.log if kind == "use"]
    # forward 0, 1; backward reaches block 1 first, then block 0 (its recompute re-uses it)
    assert uses[:2] == [0, 1] and uses[2:4] == [1, 1] and uses[-1] == 0
    copies = [i for kind, i in swapper.log if kind == "copy"]
    assert copies[0] == 0 and copies[1] == 1  # block 1's copy started while block 0 ran
    swapper.remove()
    assert {n for n, _ in model.named_parameters()} == parameters_before


def test_block_swap_in_inference_keeps_two_blocks_at_most() -> None:
    model = random_transformer("tiny", seed=1)
    model.requires_grad_(False)
    latents, text = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 12, 32)
    with torch.no_grad():
        expected = WanFamily().forward(model, latents, torch.tensor([0.5]), text)
        swapper = BlockSwapper(list(model.blocks), [0, 1], "cpu")
        got = WanFamily().forward(model, latents, torch.tensor([0.5]), text)
    assert torch.equal(expected, got) and swapper.max_resident == 2
    # block 1 is copied while block 0 runs; block 0 leaves the device when block 1 needs it
    assert swapper.log == [("copy", 0), ("use", 0), ("copy", 1), ("drop", 0), ("use", 1)]


def test_fp8_base_weights_stay_close_to_full_precision_and_train_only_lora() -> None:
    pytest.importorskip("torchao")
    from engine.families.base_weights import quantize_frozen_linears

    reference = _lora_model()
    model = _lora_model()
    count = quantize_frozen_linears(model)
    assert count == 2 * 10  # two blocks x (8 attention + 2 FFN) linears
    weight = model.blocks[0].attn1.to_q.base_layer.weight
    assert getattr(weight, "qdata", weight).dtype == torch.float8_e4m3fn
    loss_ref, grads_ref = _step(reference)
    loss, grads = _step(model)
    assert not torch.equal(grads, grads_ref)  # fp8 really is in use
    assert abs(loss - loss_ref) / loss_ref < 0.05
    assert (grads - grads_ref).norm() / grads_ref.norm() < 0.1
    # fp8 and swap together: the inner tensors of torchao's weights move, the numbers do not change
    BlockSwapper(list(model.blocks), [1], "cpu")
    loss_swapped, grads_swapped = _step(model)
    assert torch.equal(loss_swapped, loss) and torch.equal(grads_swapped, grads)


def _block_inputs_kept(model: torch.nn.Module) -> tuple[tuple[torch.Tensor, torch.Tensor], list[bool]]:
    """One step, and for each block after the first: is its input still alive once the forward is done?"""
    import weakref

    inputs: list[weakref.ref] = []
    hooks = [block.register_forward_pre_hook(
        lambda module, args: None if torch._C._current_graph_task_id() != -1 else inputs.append(weakref.ref(args[0])))
        for block in model.blocks]
    generator = torch.Generator().manual_seed(3)
    latents, text = torch.randn(1, 16, 3, 8, 8, generator=generator), torch.randn(1, 12, 32, generator=generator)
    model.zero_grad(set_to_none=True)
    loss = WanFamily().forward(model, latents, torch.tensor([0.4]), text).float().pow(2).mean()
    kept = [ref() is not None for ref in inputs[1:]]
    loss.backward()
    for hook in hooks:
        hook.remove()
    return (loss.detach(), torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])), kept


def test_activation_offload_gives_the_same_loss_and_gradients_and_keeps_no_block_input() -> None:
    """checkpointing = "offload": the checkpointed blocks' inputs go to (pinned) host memory through torch's
    save_on_cpu; the recompute gets them back. Same numbers as full checkpointing, step after step."""
    from engine.families.wan_perf import PerfOptions, apply

    full, offloaded = _lora_model(), _lora_model()
    apply(full, PerfOptions(checkpointing="full"), activation_checkpointing=True)
    applied = apply(offloaded, PerfOptions(checkpointing="offload"), activation_checkpointing=True)
    assert applied.checkpointing == "offload"
    for _ in range(2):
        (loss_ref, grads_ref), kept_ref = _block_inputs_kept(full)
        (loss, grads), kept = _block_inputs_kept(offloaded)
        assert torch.equal(loss, loss_ref) and torch.equal(grads, grads_ref)
        # full checkpointing keeps each block's input on the device until backward; offload keeps a copy
        assert kept_ref == [True] * (len(full.blocks) - 1) and kept == [False] * (len(full.blocks) - 1)
