"""What the planner needs to know about a model and a clip, read from config files only.

`ModelShape` comes from a diffusers Wan folder (transformer and VAE `config.json`, the text
encoder's safetensors header) or from a config dict (the random-weight presets of the benches);
parameter counts follow diffusers' `WanTransformer3DModel` layout (tests check them against a
model built on the meta device).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelShape", "Clip", "LORA_LINEAR_SHAPES"]


@dataclass(frozen=True)
class ModelShape:
    width: int
    ffn: int
    layers: int
    text_dim: int
    freq_dim: int
    in_channels: int
    out_channels: int
    patch: tuple[int, int, int]
    vae_spatial: int = 8
    vae_temporal: int = 4
    text_encoder_params: int = 0  # 0 = unknown (no text encoder weights found)
    head_dim: int = 128  # RoPE tables: cos and sin, head_dim wide, per token

    @classmethod
    def from_transformer_config(cls, config: dict, *, vae_spatial: int = 8, vae_temporal: int = 4,
                                text_encoder_params: int = 0) -> "ModelShape":
        return cls(width=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                   ffn=int(config["ffn_dim"]), layers=int(config["num_layers"]), text_dim=int(config["text_dim"]),
                   freq_dim=int(config.get("freq_dim", 256)), in_channels=int(config.get("in_channels", 16)),
                   out_channels=int(config.get("out_channels") or config.get("in_channels", 16)),
                   patch=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
                   vae_spatial=vae_spatial, vae_temporal=vae_temporal, text_encoder_params=text_encoder_params,
                   head_dim=int(config["attention_head_dim"]))

    @classmethod
    def from_model_dir(cls, model_dir: Path, transformer: str = "transformer") -> "ModelShape":
        """From a diffusers Wan folder without loading weights. `transformer`: the subfolder (or an
        absolute folder, model.transformer_path) whose config.json describes the trained transformer."""
        from engine.families import get_family

        model_dir = Path(model_dir)
        info = get_family("wan").describe(model_dir)
        folder = model_dir / transformer
        if not (folder / "config.json").is_file():  # a single-file transformer: its config is the default one
            folder = model_dir / (info.transformers[0] if info.transformers else "transformer")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        patch = int(config.get("patch_size", [1, 2, 2])[-1])
        return cls.from_transformer_config(config, vae_spatial=info.spatial_multiple // patch,
                                           vae_temporal=info.temporal_stride,
                                           text_encoder_params=_safetensors_params(model_dir / "text_encoder"))

    # ---- parameters --------------------------------------------------------------------------------
    @property
    def block_params(self) -> int:
        """One WanTransformerBlock: two attentions (q, k, v, out with bias; q/k RMS norms), an FFN,
        the cross-attention norm (affine) and the modulation table."""
        d, f = self.width, self.ffn
        return 8 * d * d + 2 * d * f + 21 * d + f

    @property
    def block_linear_params(self) -> int:
        """Weights of a block's linears: what fp8 stores in one byte."""
        d, f = self.width, self.ffn
        return 8 * d * d + 2 * d * f

    @property
    def other_params(self) -> int:
        """Patch embedding, time and text embedders, output head (never swapped, never fp8)."""
        d = self.width
        pt, ph, pw = self.patch
        patch_in = self.in_channels * pt * ph * pw
        return (patch_in * d + d + self.freq_dim * d + d + d * d + d + 6 * d * d + 6 * d
                + self.text_dim * d + d + d * d + d + d * self.out_channels * pt * ph * pw
                + self.out_channels * pt * ph * pw + 2 * d)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.other_params

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """LoRA weights (A and B) of all blocks for these target suffixes."""
        per_block = sum(rank * (i + o) for suffix, (i, o) in self.lora_linears().items()
                        if any(suffix == t or suffix.endswith("." + t) for t in targets))
        return per_block * self.layers

    def lora_linears(self) -> dict[str, tuple[int, int]]:
        return {name: (self._dim(i), self._dim(o)) for name, (i, o) in LORA_LINEAR_SHAPES.items()}

    def _dim(self, symbol: str) -> int:
        return self.width if symbol == "d" else self.ffn

    def lora_input_width(self, targets: list[str]) -> int:
        """Sum of LoRA input widths a video token passes through in one block (cross-attention k/v
        read the 512 text tokens, not the video tokens)."""
        return sum(i for name, (i, _) in self.lora_linears().items()
                   if any(name == t or name.endswith("." + t) for t in targets) and not name.startswith("attn2.to_k")
                   and not name.startswith("attn2.to_v"))

    # ---- clips -------------------------------------------------------------------------------------
    def tokens(self, clip: "Clip") -> int:
        """Video tokens of one sample: latent frames x latent height x latent width / patch."""
        pt, ph, pw = self.patch
        frames = (clip.frames - 1) // self.vae_temporal + 1
        return (math.ceil(frames / pt) * (clip.height // (self.vae_spatial * ph))
                * (clip.width // (self.vae_spatial * pw)))

    def latent_elements(self, clip: "Clip") -> int:
        frames = (clip.frames - 1) // self.vae_temporal + 1
        channels = self.in_channels
        return channels * frames * (clip.height // self.vae_spatial) * (clip.width // self.vae_spatial)


# Linears inside a block by the suffix LoRA targets use; d = width, f = FFN width.
LORA_LINEAR_SHAPES: dict[str, tuple[str, str]] = {
    "attn1.to_q": ("d", "d"), "attn1.to_k": ("d", "d"), "attn1.to_v": ("d", "d"), "attn1.to_out.0": ("d", "d"),
    "attn2.to_q": ("d", "d"), "attn2.to_k": ("d", "d"), "attn2.to_v": ("d", "d"), "attn2.to_out.0": ("d", "d"),
    "ffn.net.0.proj": ("d", "f"), "ffn.net.2": ("f", "d"),
}


@dataclass(frozen=True)
class Clip:
    width: int
    height: int
    frames: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


def _safetensors_params(folder: Path) -> int:
    """Parameters in a folder's .safetensors files, from their headers (no weights read)."""
    import struct

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
