"""The LoRA key layout of each Wan variant is the one ComfyUI matches (original Wan module names under
`diffusion_model.`), including the I2V image keys k_img/v_img, and diffusers loads it back."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.families.wan import WanFamily
from engine.families.wan_random import transformer_config
from engine.lora import inspect_lora, load_lora_state_dict, save_lora


def _i2v_transformer():
    from diffusers import WanTransformer3DModel

    cfg = transformer_config("tiny")
    cfg.update(in_channels=36, image_dim=24, added_kv_proj_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"])
    torch.manual_seed(0)
    return WanTransformer3DModel(**cfg)


def _lora_state(transformer, targets: list[str]) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    return get_peft_model_state_dict(transformer)


def test_i2v_default_targets_include_the_image_keys_under_comfyui_names(tmp_path: Path) -> None:
    from engine.config import DEFAULT_LORA_TARGETS

    transformer = _i2v_transformer()
    targets = WanFamily().lora_target_modules(transformer, list(DEFAULT_LORA_TARGETS))
    assert "blocks.0.attn2.add_k_proj" in targets and "blocks.1.attn2.add_v_proj" in targets
    folder = save_lora(_lora_state(transformer, targets), tmp_path / "lora", rank=4, alpha=4,
                       target_modules=list(DEFAULT_LORA_TARGETS), dtype=torch.float32)
    keys = set(load_lora_state_dict(folder))
    for module in ("self_attn.q", "self_attn.o", "cross_attn.k", "cross_attn.k_img", "cross_attn.v_img", "ffn.0",
                   "ffn.2"):
        assert f"diffusion_model.blocks.1.{module}.lora_A.weight" in keys, module
    assert not any(".attn1." in k or ".attn2." in k or "add_k_proj" in k for k in keys)  # no diffusers names
    assert inspect_lora(folder).key_format == "comfy"

    from diffusers import WanImageToVideoPipeline

    # diffusers' converter reads our file back onto the same modules, image keys included
    converted, _ = WanImageToVideoPipeline.lora_state_dict(load_lora_state_dict(folder), return_lora_metadata=True)
    assert any("attn2.add_k_proj.lora_A" in k for k in converted)


def test_t2v_targets_have_no_image_keys() -> None:
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(**transformer_config("tiny"))
    targets = WanFamily().lora_target_modules(transformer, ["to_k", "to_v"])
    assert targets and not any("add_" in t for t in targets)
