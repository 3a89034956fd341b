"""LoRA files: ComfyUI keys, diffusers loads them, corrupt/foreign files give clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.config import DEFAULT_LORA_TARGETS
from engine.families import get_family
from engine.families.wan_random import build_random_wan
from engine.lora import (
    LoraFamilyError,
    LoraFormatError,
    inspect_lora,
    peft_state_from_file,
    save_lora,
    validate_lora,
)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_wan(tmp_path_factory.mktemp("wan") / "tiny", preset="tiny", seed=0)


def random_lora_state(model_dir: Path, rank: int = 4) -> tuple[dict[str, torch.Tensor], list[str]]:
    from peft import LoraConfig, get_peft_model_state_dict

    family = get_family("wan")
    transformer = family.load_transformer(model_dir, "transformer", torch.device("cpu"), torch.float32)
    targets = family.lora_target_modules(transformer, list(DEFAULT_LORA_TARGETS))
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) * 0.5 for k, v in get_peft_model_state_dict(transformer).items()}
    return state, targets


def test_saved_lora_has_comfy_keys_and_loads_in_diffusers(tiny_wan: Path, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    state, targets = random_lora_state(tiny_wan)
    out = save_lora(state, tmp_path / "epoch1", rank=4, alpha=8, target_modules=targets)
    info = inspect_lora(out)
    assert info.family == "wan" and info.key_format == "comfy" and info.rank == 4
    assert info.num_modules == len(targets) and info.num_blocks == 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys and "diffusion_model.blocks.1.ffn.2.lora_B.weight" in keys
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith(".lora_B.weight") for k in keys)
    # alpha/rank = 2 is folded into B; reading back for a (rank 4, alpha 8) model restores it.
    back = peft_state_from_file(out, rank=4, alpha=8)
    some_b = next(k for k in state if k.endswith("lora_B.weight"))
    torch.testing.assert_close(back[some_b].float(), state[some_b], atol=0.02, rtol=0.02)

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    kwargs = dict(prompt="a star", num_frames=1, height=32, width=32, num_inference_steps=2, output_type="pt")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(out / "adapter_model.safetensors"), adapter_name="test")
    with_lora = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert (with_lora - base).abs().max() > 1e-3


def test_truncated_and_corrupt_files_are_named(tmp_path: Path, tiny_wan: Path) -> None:
    state, targets = random_lora_state(tiny_wan)
    good = save_lora(state, tmp_path / "good", rank=4, alpha=4, target_modules=targets) / "adapter_model.safetensors"
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match="truncated"):
        inspect_lora(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"x" * 32)
    with pytest.raises(LoraFormatError, match="corrupt"):
        inspect_lora(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(LoraFormatError, match="too small"):
        inspect_lora(tiny)
    with pytest.raises(LoraFormatError, match="not found"):
        inspect_lora(tmp_path / "nope.safetensors")


def test_lora_of_another_family_is_refused(tmp_path: Path) -> None:
    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(flux))
    assert inspect_lora(flux).family == "flux"
    with pytest.raises(LoraFamilyError, match="flux"):
        validate_lora(flux, "wan")
    no_lora = tmp_path / "weights.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}, str(no_lora))
    with pytest.raises(LoraFormatError, match="no LoRA weights"):
        inspect_lora(no_lora)


def test_kohya_wan_lora_is_recognised_and_block_count_checked(tmp_path: Path) -> None:
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_blocks_39_self_attn_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_blocks_39_self_attn_q.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_blocks_39_self_attn_q.alpha": torch.tensor(4.0)}, str(kohya))
    info = validate_lora(kohya, "wan")
    assert info.key_format == "kohya" and info.rank == 4
    with pytest.raises(LoraFamilyError, match="block 39"):
        validate_lora(kohya, "wan", num_blocks=30)


def test_init_from_a_lora_with_alpha_keys_starts_from_the_update_it_applies(tmp_path: Path) -> None:
    """ComfyUI/musubi files keep alpha per module (delta = B @ A * alpha / r): it is folded into B."""
    from safetensors.torch import save_file

    a, b = torch.randn(4, 16), torch.randn(16, 4)
    file = tmp_path / "other_tool.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b,
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)}, str(file))
    back = peft_state_from_file(file, rank=4, alpha=4)  # the training model's scale is 1
    delta = back["blocks.0.attn1.to_q.lora_B.weight"] @ back["blocks.0.attn1.to_q.lora_A.weight"]
    torch.testing.assert_close(delta, b @ a * 2.0 / 4)
