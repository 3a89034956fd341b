"""The Wan family (Wan2.1 T2V 1.3B/14B, Wan2.1 I2V 14B, Wan2.2 T2V and I2V A14B: one expert or both,
Wan2.2 TI2V-5B) from a local diffusers folder.

TI2V-5B needs nothing of its own for text-to-video: its 48-channel VAE and 16x compression are read
from the VAE config (`describe`), and the per-token timesteps its pipeline uses (`expand_timesteps`)
are all equal without a start image, so training passes one t per sample.

Image-to-video, as diffusers' WanImageToVideoPipeline builds its inputs (`image_mode`):
- "concat" (Wan2.1 I2V, Wan2.2 I2V A14B: a 36-channel transformer): the noisy latents, a 4-channel mask
  (ones on the first latent frame) and the VAE latents of [first frame, black frames...] are concatenated
  on channels; Wan2.1 I2V also attends to the CLIP-vision embedding of the first frame (`k_img`/`v_img`).
- "first_frame" (TI2V-5B with a start image): the first latent frame is the clean image latent and its
  tokens get timestep 0; the loss leaves that frame out (inference overwrites it).

All transformer forwards for training go through `WanFamily.forward`, so attention backends and
compilation can be switched in one place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError
from engine.families import Encoders, ModelFamily
from engine.models import ModelNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["WanFamily", "WanModelInfo", "TEXT_LENGTH", "IMAGE_MODES", "pipeline_class_name"]

# Wan pads every prompt to 512 tokens of UMT5 output (zeros after the real tokens).
TEXT_LENGTH = 512
# I2V cross-attention's image projections, trained with the text ones (ComfyUI: cross_attn.k_img/v_img).
_IMAGE_KV = {"to_k": "attn2.add_k_proj", "to_v": "attn2.add_v_proj"}
_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
IMAGE_MODES = ("none", "concat", "first_frame")


@dataclass(frozen=True)
class WanModelInfo:
    spatial_multiple: int  # VAE spatial stride x transformer patch
    temporal_stride: int  # frames = stride * k + 1
    latent_channels: int
    num_blocks: int
    transformers: tuple[str, ...]  # subfolders holding a transformer ("transformer", "transformer_2")
    # Wan2.2 A14B: noise levels t >= boundary_ratio go to `transformer` (the high-noise expert), the
    # rest to `transformer_2` (low noise). None for a single transformer.
    boundary_ratio: float | None = None
    image_mode: str = "none"  # the model's own image conditioning ("concat" I2V; TI2V-5B: "first_frame" optional)
    image_encoder: bool = False  # Wan2.1 I2V: a CLIP vision encoder whose embedding cross-attention reads

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None and len(self.transformers) == 2


class WanFamily(ModelFamily):
    name = "wan"

    # ---- description without loading weights ---------------------------------------------------
    def describe(self, model_dir: Path) -> WanModelInfo:
        model_dir = Path(model_dir)
        index = _read_json(model_dir / "model_index.json")
        pipeline_class_name(model_dir, index)
        vae_cfg = _read_json(model_dir / "vae" / "config.json")
        transformers = tuple(name for name in ("transformer", "transformer_2") if _present(index, name))
        t_cfg = _read_json(model_dir / transformers[0] / "config.json") if transformers else {}
        patch = t_cfg.get("patch_size", [1, 2, 2])
        spatial = int(vae_cfg.get("scale_factor_spatial") or 8) * int(patch[-1])
        z_dim = int(vae_cfg.get("z_dim", 16))
        if int(t_cfg.get("in_channels", z_dim)) == 2 * z_dim + 4:  # noise + mask (4) + first-frame latents
            image_mode = "concat"
        else:
            image_mode = "first_frame" if index.get("expand_timesteps") else "none"
        return WanModelInfo(
            spatial_multiple=spatial,
            temporal_stride=int(vae_cfg.get("scale_factor_temporal") or 4),
            latent_channels=z_dim,
            num_blocks=int(t_cfg.get("num_layers", 0)),
            transformers=transformers,
            boundary_ratio=float(index["boundary_ratio"]) if index.get("boundary_ratio") is not None else None,
            image_mode=image_mode,
            image_encoder=_present(index, "image_encoder"),
        )

    def image_mode(self, model_dir: Path, image_to_video: bool | None) -> str:
        own = self.describe(model_dir).image_mode
        if own == "concat":  # the model cannot run without its start image
            if image_to_video is False:
                raise ConfigError("model.image_to_video", f"{model_dir} is an image-to-video model: it needs the "
                                                          "start frame (leave image_to_video out or true)")
            return own
        if image_to_video and own == "none":
            raise ConfigError("model.image_to_video", f"{model_dir} is a text-to-video model; image-to-video needs "
                                                      "a Wan I2V model or Wan2.2 TI2V-5B")
        return own if image_to_video else "none"

    # ---- encoders (used once, to fill the cache) ------------------------------------------------
    def load_encoders(self, model_dir: Path, device: torch.device, dtype: torch.dtype) -> Encoders:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
        text_encoder = UMT5EncoderModel.from_pretrained(str(model_dir / "text_encoder"), torch_dtype=dtype)
        # The Wan VAE is run in float32: it is small and bf16 visibly hurts latents.
        vae = AutoencoderKLWan.from_pretrained(str(model_dir / "vae"), torch_dtype=torch.float32)
        text_encoder.to(device).eval().requires_grad_(False)
        vae.to(device).eval().requires_grad_(False)
        image_encoder = image_processor = None
        if self.describe(model_dir).image_encoder:  # Wan2.1 I2V: CLIP vision, float32 as Wan's examples run it
            from transformers import CLIPImageProcessor, CLIPVisionModel

            image_processor = CLIPImageProcessor.from_pretrained(str(model_dir / "image_processor"))
            image_encoder = CLIPVisionModel.from_pretrained(str(model_dir / "image_encoder"), torch_dtype=torch.float32)
            image_encoder.to(device).eval().requires_grad_(False)
        return Encoders(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, device=device, dtype=dtype,
                        image_encoder=image_encoder, image_processor=image_processor)

    @torch.no_grad()
    def encode_text(self, enc: Encoders, captions: list[str]) -> list[torch.Tensor]:
        tokens = enc.tokenizer(
            captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids = tokens.input_ids.to(enc.device)
        mask = tokens.attention_mask.to(enc.device)
        hidden = enc.text_encoder(ids, mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        return [h[: int(n)].float().cpu() for h, n in zip(hidden, lengths)]

    @torch.no_grad()
    def encode_media(self, enc: Encoders, pixels: torch.Tensor) -> torch.Tensor:
        vae = enc.vae
        pixels = pixels.to(enc.device, torch.float32)
        latents = vae.encode(pixels).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        return ((latents - mean) / std).float().cpu()

    @torch.no_grad()
    def encode_conditioning(self, enc: Encoders, pixels: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """"concat": the latents of the first frame followed by black frames (WanImageToVideoPipeline's
        `video_condition`) and, with an image encoder, the penultimate CLIP hidden states of the first
        frame (its `encode_image`). "first_frame" needs nothing: the clip's own first latent frame is the
        first pixel frame's encoding (the Wan VAE is causal)."""
        if mode != "concat":
            return {}
        first = pixels[:, :, :1]
        video = torch.cat([first, first.new_zeros(*first.shape[:2], pixels.shape[2] - 1, *first.shape[3:])], dim=2)
        out = {"image_latents": self.encode_media(enc, video)[0]}
        if enc.image_encoder is not None:
            frame = ((first[0, :, 0].permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            inputs = enc.image_processor(images=frame, return_tensors="pt").to(enc.device)
            hidden = enc.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
            out["image_embeds"] = hidden[0].float().cpu()
        return out

    def condition_batch(self, mode: str, latents: torch.Tensor,
                        cached: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        if mode == "first_frame":
            return {"first_frame": latents[:, :, :1]}
        if mode != "concat":
            return None
        return {key: torch.stack([c[key] for c in cached]) for key in cached[0] if key != "latents"}

    def given_frames(self, condition: dict[str, torch.Tensor] | None) -> int:
        return condition["first_frame"].shape[2] if condition and "first_frame" in condition else 0

    # ---- the trained transformer ----------------------------------------------------------------
    def load_transformer(self, model_dir: Path, subfolder: str, device: torch.device,
                         dtype: torch.dtype, config_subfolder: str = "transformer") -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        source = Path(model_dir) / subfolder  # an absolute `subfolder` (model.transformer_path) stays itself
        key = "model.transformer_subfolder" if source.parent == Path(model_dir) else "model.transformer_path"
        # torch_dtype at load time keeps host RAM at the target size (no fp32 copy of a 14B model).
        if source.is_file() and source.suffix == ".safetensors":  # a ComfyUI / original-format single file
            config = Path(model_dir) / config_subfolder
            if not (config / "config.json").is_file():
                raise ConfigError(key, f"{source}: a single-file transformer needs {config}/config.json")
            model = WanTransformer3DModel.from_single_file(str(source), config=str(config), torch_dtype=dtype)
        elif (source / "config.json").is_file():
            model = WanTransformer3DModel.from_pretrained(str(source), torch_dtype=dtype, low_cpu_mem_usage=True)
        else:
            raise ConfigError(key, f"{source} holds no transformer: expected a diffusers folder (config.json) "
                                   "or a single .safetensors file")
        model.to(device)
        model.requires_grad_(False)
        return model

    def lora_target_modules(self, transformer: torch.nn.Module, suffixes: list[str]) -> list[str]:
        """Linears in the blocks ending in one of `suffixes`. Image-to-video models (Wan2.1 I2V) also
        get the image keys/values of cross-attention (`k_img`/`v_img`, diffusers' `attn2.add_k_proj`/
        `add_v_proj`) wherever `to_k`/`to_v` are targeted: they are that attention's other keys/values."""
        suffixes = list(suffixes) + [image for text, image in _IMAGE_KV.items() if text in suffixes]
        names = []
        for name, module in transformer.named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.startswith("blocks."):
                continue
            if any(name.endswith("." + s) for s in suffixes):
                names.append(name)
        if not names:
            raise ConfigError("adapter.target_modules", f"{suffixes} match no linear layer in the Wan blocks")
        return names

    def sampling_pipeline(self, model_dir: Path, transformer: torch.nn.Module, vae: Any,
                          transformer_2: torch.nn.Module | None = None, boundary_ratio: float | None = None,
                          image_mode: str = "none", image_encoder: tuple[Any, Any] = (None, None)) -> Any:
        import diffusers

        config = _read_json(Path(model_dir) / "scheduler" / "scheduler_config.json")
        scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(str(model_dir), subfolder="scheduler")
        index = _read_json(Path(model_dir) / "model_index.json")
        common = dict(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler,
                      transformer_2=transformer_2, boundary_ratio=boundary_ratio if transformer_2 is not None else None,
                      expand_timesteps=bool(index.get("expand_timesteps")))  # TI2V-5B: per-token t
        if image_mode == "none":
            pipe = diffusers.WanPipeline(**common)
        else:  # Wan2.1 I2V: (CLIP vision encoder, its processor); the others have none
            pipe = diffusers.WanImageToVideoPipeline(**common, image_encoder=image_encoder[0],
                                                     image_processor=image_encoder[1])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pad_text(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        dim = embeds[0].shape[-1]
        out = embeds[0].new_zeros(len(embeds), TEXT_LENGTH, dim)
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]] = e[:TEXT_LENGTH]
        return out

    def forward(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor, condition: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Flow-matching velocity prediction; Wan takes timesteps on the 0..1000 scale."""
        hidden, timestep, image = noisy_latents, t * 1000.0, None
        condition = condition or {}
        if "image_latents" in condition:  # channels: noisy, mask (ones on the first latent frame), first frame
            cond = condition["image_latents"].to(hidden.dtype)
            mask = torch.zeros_like(cond[:, :4])
            mask[:, :, 0] = 1.0
            hidden = torch.cat([hidden, mask, cond], dim=1)
            image = condition.get("image_embeds")
            image = image.to(hidden.dtype) if image is not None else None
        if "first_frame" in condition:  # TI2V: clean first frame, its tokens at t = 0 (expand_timesteps)
            given = condition["first_frame"].shape[2]
            hidden = torch.cat([condition["first_frame"].to(hidden.dtype), hidden[:, :, given:]], dim=2)
            p_t, p_h, p_w = transformer.config.patch_size
            per_frame = torch.ones(hidden.shape[2] // p_t, hidden.shape[3] // p_h, hidden.shape[4] // p_w,
                                   device=hidden.device)
            per_frame[: given // p_t] = 0.0
            timestep = timestep.view(-1, 1) * per_frame.flatten().view(1, -1)
        return transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]


def pipeline_class_name(model_dir: Path, index: dict | None = None) -> str:
    """The diffusers pipeline a Wan folder names (WanPipeline or WanImageToVideoPipeline)."""
    index = index if index is not None else _read_json(Path(model_dir) / "model_index.json")
    name = index.get("_class_name") or "WanPipeline"
    if name not in _PIPELINES:
        raise ModelNotFoundError(f"{model_dir}: model_index.json describes {name!r}, not a Wan pipeline "
                                 f"({' or '.join(_PIPELINES)})")
    return name


def _present(index: dict, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and entry[0] is not None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: not a complete diffusers Wan folder")
    return json.loads(path.read_text(encoding="utf-8"))
