"""Model families: one module per family says how to load it, encode text and media, which
linears LoRA targets, the training target and the forward call.

`get_family("wan")` returns the family object; new families (Wan I2V, HunyuanVideo, LTX-Video)
implement `ModelFamily` and are added to `get_family` and `family_names`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelFamily", "Encoders", "get_family", "family_names", "UnknownFamilyError"]


class UnknownFamilyError(ValueError):
    pass


@dataclass
class Encoders:
    """Whatever a family needs to turn captions and pixels into training inputs."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    image_encoder: Any = None  # image-to-video models with an image encoder (Wan2.1 I2V: CLIP vision)
    image_processor: Any = None


class ModelFamily(abc.ABC):
    """The contract between the trainer (and inference) and one model family."""

    name: str

    @abc.abstractmethod
    def describe(self, model_dir: Path) -> Any:
        """Shapes read from config files, without loading weights (spatial_multiple,
        temporal_stride, latent_channels, num_blocks, ...)."""

    @abc.abstractmethod
    def load_encoders(self, model_dir: Path, device: torch.device, dtype: torch.dtype) -> Encoders: ...

    @abc.abstractmethod
    def encode_text(self, enc: Encoders, captions: list[str]) -> list[torch.Tensor]:
        """One [tokens, dim] tensor per caption (unpadded)."""

    @abc.abstractmethod
    def encode_media(self, enc: Encoders, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, f, h, w]."""

    def image_mode(self, model_dir: Path, image_to_video: bool | None) -> str:
        """How the model is conditioned on a start image ("none" for text-to-video), given the config's
        `model.image_to_video` (None: the model's own way). Families without image-to-video return "none"."""
        return "none"

    def encode_conditioning(self, enc: Encoders, pixels: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """What the clip's first frame adds to its cached latents for image-to-video training (one sample,
        no batch dimension); empty for text-to-video."""
        return {}

    def condition_batch(self, mode: str, latents: torch.Tensor,
                        cached: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The conditioning of a micro-batch from its latents and each sample's cached extras (None: none)."""
        return None

    def given_frames(self, condition: dict[str, torch.Tensor] | None) -> int:
        """Leading latent frames the conditioning gives clean: not noised and left out of the loss."""
        return 0

    @abc.abstractmethod
    def load_transformer(self, model_dir: Path, subfolder: str, device: torch.device,
                         dtype: torch.dtype, config_subfolder: str = "transformer") -> torch.nn.Module:
        """The transformer in `model_dir / subfolder` (an absolute path: itself), a diffusers folder or
        a single .safetensors file whose config is `model_dir / config_subfolder`."""

    @abc.abstractmethod
    def lora_target_modules(self, transformer: torch.nn.Module, suffixes: list[str]) -> list[str]:
        """Full module names inside the transformer that get LoRA."""

    @abc.abstractmethod
    def forward(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor, condition: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model's prediction for noisy latents at noise level t in [0, 1] (image-to-video: given the
        micro-batch's `condition_batch`)."""

    @abc.abstractmethod
    def pad_text(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        """Stack unpadded text embeddings into the batch layout the transformer expects."""

    @abc.abstractmethod
    def sampling_pipeline(self, model_dir: Path, transformer: torch.nn.Module, vae: Any,
                          transformer_2: torch.nn.Module | None = None, boundary_ratio: float | None = None,
                          image_mode: str = "none", image_encoder: tuple[Any, Any] = (None, None)) -> Any:
        """A diffusers pipeline over the given (training) transformer and VAE, without a text encoder:
        samples during training take precomputed `pad_text` embeddings, as inference takes its own.
        Two experts (Wan2.2 A14B): `transformer` denoises t >= boundary_ratio, `transformer_2` the rest.
        An `image_mode` other than "none" gives the image-to-video pipeline (with Wan2.1 I2V's
        `image_encoder` = (encoder, processor)), which takes a start image."""

    def enable_activation_checkpointing(self, transformer: torch.nn.Module) -> None:
        transformer.enable_gradient_checkpointing()


def get_family(name: str) -> ModelFamily:
    if name == "wan":
        from engine.families.wan import WanFamily

        return WanFamily()
    raise UnknownFamilyError(f"unknown model family {name!r}; available: {', '.join(family_names())}")


def family_names() -> list[str]:
    return ["wan"]
