"""Training presets for the Train tab: the demo on CPU and Wan starting points (the GPU ones fit an 80 GB card)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import ConfigError, TrainConfig
from engine.paths import REPO_ROOT

DEMO_PRESET = "Demo LoRA (CPU, minutes)"
DEMO_TOML = REPO_ROOT / "examples" / "demo_lora.toml"

# Overrides by key path on top of TrainConfig defaults.
_A14B_BOTH: dict[str, Any] = {
    "model.ckpt_path": "/path/to/Wan2.2-T2V-A14B-Diffusers",
    "model.dtype": "bfloat16",
    "model.experts": "both",  # one LoRA per expert; boundary from the model's model_index.json
    "model.idle_expert": "offload",  # one 14B expert on the GPU, the idle one in pinned host RAM
    "dataset.resolutions": [480],
    "dataset.frame_buckets": [1, 33],
    "adapter.rank": 32,
    "optimizer.lr": 2e-5,
    "epochs": 20,
    "gradient_accumulation_steps": 4,
    "zero_stage": 0,  # two experts need it: each step updates one expert's LoRA
    "activation_checkpointing": True,
    "save_every_n_epochs": 2,
    "checkpoint_every_n_minutes": 60.0,
    "performance.attention_backend": "flash3",
    "performance.checkpointing": "save_attention",
}

_TI2V_5B: dict[str, Any] = {
    "model.ckpt_path": "/path/to/Wan2.2-TI2V-5B-Diffusers",  # text-to-video; 48-channel VAE, 32 px per token
    "model.dtype": "bfloat16",
    "dataset.resolutions": [704],
    "dataset.frame_buckets": [1, 49],
    "adapter.rank": 32,
    "optimizer.lr": 3e-5,
    "epochs": 30,
    "warmup_steps": 50,
    "save_every_n_epochs": 5,
    "checkpoint_every_n_minutes": 60.0,
    "activation_checkpointing": True,
    "performance.attention_backend": "flash3",
    "performance.checkpointing": "save_attention",
    "performance.compile_blocks": True,
}

WAN_PRESETS: dict[str, dict[str, Any]] = {
    "Wan2.1 1.3B · 480p": {
        "model.ckpt_path": "/path/to/Wan2.1-T2V-1.3B-Diffusers",
        "model.dtype": "bfloat16",
        "dataset.resolutions": [480],
        "dataset.frame_buckets": [1, 33],
        "adapter.rank": 32,
        "optimizer.lr": 2e-5,
        "epochs": 40,
        "warmup_steps": 100,
        "save_every_n_epochs": 5,
        "checkpoint_every_n_minutes": 60.0,
        "activation_checkpointing": True,
        # docs/performance.md: 1.9x a plain loop on an H100; each falls back safely (no FA3, no GPU).
        "performance.attention_backend": "flash3",
        "performance.checkpointing": "save_attention",
        "performance.lora_compute_dtype": "activation",
        "performance.compile_blocks": True,
    },
    "Wan2.1 14B · low VRAM": {
        "model.ckpt_path": "/path/to/Wan2.1-T2V-14B-Diffusers",
        "model.dtype": "bfloat16",
        "dataset.resolutions": [384],
        "dataset.frame_buckets": [1, 17],
        "adapter.rank": 16,
        "adapter.dtype": "bfloat16",
        "optimizer.lr": 1e-5,
        "epochs": 20,
        "zero_stage": 2,
        "activation_checkpointing": True,
        "save_every_n_epochs": 2,
        "checkpoint_every_n_minutes": 30.0,
        "performance.attention_backend": "flash3",  # no memory cost; falls back to cuDNN
        "performance.compile_blocks": True,
    },
    "Wan2.2 A14B · both experts · 80 GB": _A14B_BOTH,
    "Wan2.2 TI2V-5B · 720p": _TI2V_5B,
    # Image-to-video: every clip's first frame is its start image (cached with its latents).
    "Wan2.1 I2V 14B · 480p · 80 GB": {
        "model.ckpt_path": "/path/to/Wan2.1-I2V-14B-480P-Diffusers",  # CLIP image encoder + k_img/v_img LoRA
        "model.dtype": "bfloat16",
        "dataset.resolutions": [480],
        "dataset.frame_buckets": [33],
        "adapter.rank": 32,
        "optimizer.lr": 2e-5,
        "epochs": 20,
        "gradient_accumulation_steps": 4,
        "activation_checkpointing": True,
        "save_every_n_epochs": 2,
        "checkpoint_every_n_minutes": 60.0,
        "performance.attention_backend": "flash3",
        "performance.checkpointing": "save_attention",
    },
    "Wan2.2 I2V A14B · both experts · 80 GB": {  # boundary 0.9 from its model_index.json
        **_A14B_BOTH, "model.ckpt_path": "/path/to/Wan2.2-I2V-A14B-Diffusers", "dataset.frame_buckets": [33]},
    "Wan2.2 TI2V-5B · image-to-video · 720p": {  # clean first latent frame at t = 0, left out of the loss
        **_TI2V_5B, "model.image_to_video": True, "dataset.frame_buckets": [49]},
}
PRESET_NAMES: tuple[str, ...] = (DEMO_PRESET, *WAN_PRESETS)


def load_preset(name: str, runs_dir: Path, studio_home: Path) -> TrainConfig:
    """The preset's config; the demo preset reads examples/demo_lora.toml (its dataset lives in the data dir)."""
    if name == DEMO_PRESET:
        if not DEMO_TOML.is_file():
            raise ConfigError("", f"the demo config {DEMO_TOML.name} is missing from examples/")
        text = DEMO_TOML.read_text(encoding="utf-8").replace("${STUDIO_HOME}", str(studio_home))
        cfg = TrainConfig.from_toml_string(text, base_dir=studio_home)
    elif name in WAN_PRESETS:
        cfg = TrainConfig(output_dir=str(runs_dir))
        for path, value in WAN_PRESETS[name].items():
            cfg = cfg.with_value(path, value)
    else:
        raise ConfigError("", f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return cfg.with_value("output_dir", str(runs_dir))
