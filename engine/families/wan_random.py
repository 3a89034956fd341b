"""Random-weight Wan models built locally (no downloads): complete tiny pipeline folders of every Wan
family for tests (Wan2.1 T2V/I2V, Wan2.2 A14B T2V/I2V with two experts, TI2V-5B), and transformers of
the real shapes for GPU benchmarks."""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "TRANSFORMER_PRESETS",
    "build_random_wan",
    "build_real_shape_wan",
    "build_real_shape_family",
    "build_tiny_family",
    "REAL_SHAPE_FAMILIES",
    "build_tokenizer",
    "I2V_KINDS",
    "random_transformer",
    "transformer_config",
]

# Wan2.1 shapes from the published configs; "tiny"/"small" are ours for CPU tests and demos.
TRANSFORMER_PRESETS: dict[str, dict] = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32),
    "small": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=4, text_dim=64, freq_dim=64),
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096, freq_dim=256),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256),
    # Wan2.2 TI2V-5B (48 latent channels in and out: set by the builders)
    "5B": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, text_dim=4096, freq_dim=256),
}

_TEXT_ENCODER_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1),
    "small": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2),
}

# Wan2.1 I2V's image encoder is CLIP ViT-H/14 (1280 wide, 257 tokens from 224 px); ours keep the layout.
_CLIP_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=16),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=16),
    # real width and token count, 2 of its 32 layers: it runs once per clip while caching
    "real": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=2, num_attention_heads=16,
                 image_size=224, patch_size=14),
}
# "wan2.1": Wan2.1 I2V (36-channel transformer + CLIP image keys/values in cross-attention);
# "wan2.2": Wan2.2 I2V A14B (36 channels, no image encoder).
I2V_KINDS = ("wan2.1", "wan2.2")

_VAE_PRESETS: dict[str, dict] = {
    "tiny": dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "small": dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
}


def transformer_config(preset: str) -> dict:
    if preset not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown Wan preset {preset!r}; choose one of {sorted(TRANSFORMER_PRESETS)}")
    return dict(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        **TRANSFORMER_PRESETS[preset],
    )


def random_transformer(preset: str = "1.3B", seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu"):
    """A WanTransformer3DModel of a preset's shape with random weights (1.3B/14B for GPU benches)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**transformer_config(preset))
    return model.to(dtype=dtype)


def build_tokenizer(path: Path | None = None):
    """A character-level tokenizer (no download): every printable character is one token, '</s>' ends."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # BPE without merges splits every word into characters: captions stay distinguishable.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.BPEDecoder()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def build_random_wan(path: str | Path, preset: str = "tiny", seed: int = 0,
                     transformer_preset: str | None = None,
                     transformer_dtype: torch.dtype = torch.float32, boundary_ratio: float | None = None,
                     vae: str = "wan2.1", i2v: str | None = None) -> Path:
    """Write a complete diffusers WanPipeline folder with random weights at `path`; returns it.

    "tiny" loads and runs a training step in about a second on a CPU core. `transformer_preset`
    ("1.3B", "14B") swaps in a transformer of real shape (with a text encoder of matching width)
    for GPU runs of the whole trainer. A `boundary_ratio` makes it a Wan2.2 A14B-style pair of
    experts: `transformer` (high noise, t >= boundary) and `transformer_2` (low noise), each with
    its own random weights, and the ratio in model_index.json as Wan2.2's own folders have it.
    `vae="wan2.2"` makes it a Wan2.2 TI2V-5B-style model: the 48-channel VAE that patchifies 2x2 and
    compresses 16x16 spatially (32 px per token with the transformer's patch), a 48-channel transformer
    and per-token timesteps (`expand_timesteps`) at inference.
    `i2v` makes it an image-to-video model (a WanImageToVideoPipeline folder): "wan2.1" as Wan2.1 I2V
    (36 input channels, a CLIP vision encoder and `k_img`/`v_img` in cross-attention), "wan2.2" as
    Wan2.2 I2V A14B (36 channels, no image encoder; give a boundary_ratio, 0.9 as Wan's, for its experts).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if preset not in _VAE_PRESETS:
        raise ValueError(f"build_random_wan supports presets {sorted(_VAE_PRESETS)}, not {preset!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = build_tokenizer(path / "tokenizer")
    text_cfg = dict(_TEXT_ENCODER_PRESETS[preset])
    t_cfg = transformer_config(transformer_preset or preset)
    if transformer_preset:
        text_cfg.update(d_model=t_cfg["text_dim"], d_kv=t_cfg["text_dim"] // text_cfg["num_heads"])
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0, **text_cfg)
    )
    text_encoder.save_pretrained(str(path / "text_encoder"))

    t_cfg["text_dim"] = text_cfg["d_model"]
    z_dim = _VAE_Z_DIM[vae]
    t_cfg.update(in_channels=z_dim, out_channels=z_dim)
    if i2v is not None:
        t_cfg.update(_i2v_transformer_config(i2v, z_dim, t_cfg, preset))
        if i2v == "wan2.1":
            _save_image_encoder(path, _CLIP_PRESETS[preset])
    transformer = WanTransformer3DModel(**t_cfg).to(transformer_dtype)
    transformer.save_pretrained(str(path / "transformer"))
    del transformer
    if boundary_ratio is not None:  # the low-noise expert: same shape, its own weights
        WanTransformer3DModel(**t_cfg).to(transformer_dtype).save_pretrained(str(path / "transformer_2"))

    AutoencoderKLWan(**_vae_config(vae, preset)).save_pretrained(str(path / "vae"))

    _write_scheduler_and_index(path, boundary_ratio, expand_timesteps=vae == "wan2.2", i2v=i2v)
    logger.info("built random Wan (%s) at %s", preset, path)
    return path


REAL_SHAPE_DESCRIPTION = "random Wan2.1 transformer shape (2-layer 4096-wide text encoder, Wan2.1 VAE)"

# family -> (transformer preset, VAE, image-to-video kind, boundary_ratio) of the published models
REAL_SHAPE_FAMILIES: dict[str, tuple[str, str, str | None, float | None]] = {
    "wan21_t2v_1.3B": ("1.3B", "wan2.1", None, None),
    "wan21_t2v_14B": ("14B", "wan2.1", None, None),
    "wan21_i2v_14B": ("14B", "wan2.1", "wan2.1", None),
    "wan22_t2v_a14b": ("14B", "wan2.1", None, 0.875),
    "wan22_i2v_a14b": ("14B", "wan2.1", "wan2.2", 0.9),
    "wan22_ti2v_5b": ("5B", "wan2.2", None, None),
}


def build_real_shape_wan(path: str | Path, transformer_preset: str = "1.3B", device: str = "cuda") -> Path:
    """A WanPipeline folder whose transformer and VAE have the real Wan2.1 shapes (random weights)."""
    return build_real_shape_family(path, f"wan21_t2v_{transformer_preset}", device)


def build_real_shape_family(path: str | Path, family: str, device: str = "cuda") -> Path:
    """A pipeline folder of a Wan family (`REAL_SHAPE_FAMILIES`) with real-shape transformer(s) and VAE and
    random weights. The text encoder keeps UMT5-XXL's width (4096) but only 2 layers, and Wan2.1 I2V's CLIP
    encoder keeps ViT-H's width and 257 tokens with 2 layers: they run once per prompt or clip (cached for
    training), so the time of what matters (denoising, VAE encode/decode) is the real model's. The two
    experts of an A14B folder share one weight file (`transformer_2` links to it): the trainer still
    loads two transformers, and the disk holds 28 GB instead of 56."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    if family not in REAL_SHAPE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(REAL_SHAPE_FAMILIES)}")
    preset, vae_kind, i2v, boundary = REAL_SHAPE_FAMILIES[family]
    path = Path(path)
    tokenizer = build_tokenizer(path / "tokenizer")
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    text_encoder.to(torch.bfloat16).save_pretrained(str(path / "text_encoder"))
    del text_encoder
    t_cfg = transformer_config(preset)
    z_dim = _VAE_Z_DIM[vae_kind]
    t_cfg.update(in_channels=z_dim, out_channels=z_dim)
    if i2v is not None:
        t_cfg.update(_i2v_transformer_config(i2v, z_dim, t_cfg, "real"))
        if i2v == "wan2.1":
            _save_image_encoder(path, _CLIP_PRESETS["real"])
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**t_cfg)
    transformer.to(torch.bfloat16).save_pretrained(str(path / "transformer"))
    del transformer
    if boundary is not None:
        (path / "transformer_2").symlink_to("transformer", target_is_directory=True)
    with torch.device(device):
        vae = AutoencoderKLWan(**_REAL_VAES[vae_kind])
    vae.save_pretrained(str(path / "vae"))
    del vae
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    _write_scheduler_and_index(path, boundary, expand_timesteps=vae_kind == "wan2.2", i2v=i2v)
    logger.info("built real-shape random %s at %s", family, path)
    return path


def build_tiny_family(path: str | Path, family: str) -> Path:
    """The tiny CPU stand-in of a `REAL_SHAPE_FAMILIES` family (same layout, tiny shapes), for smoke runs."""
    _, vae_kind, i2v, boundary = REAL_SHAPE_FAMILIES[family]
    return build_random_wan(path, "tiny", vae=vae_kind, i2v=i2v, boundary_ratio=boundary)


# The published VAEs' shapes: Wan2.1's is diffusers' default; Wan2.2 TI2V-5B's compresses 16x16 to 48 channels.
_REAL_VAES: dict[str, dict] = {
    "wan2.1": {},
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
}


_VAE_Z_DIM = {"wan2.1": 16, "wan2.2": 48}


def _vae_config(vae: str, preset: str) -> dict:
    if vae not in _VAE_Z_DIM:
        raise ValueError(f"unknown Wan VAE {vae!r}; choose one of {sorted(_VAE_Z_DIM)}")
    config = dict(z_dim=_VAE_Z_DIM[vae], **_VAE_PRESETS[preset])
    if vae == "wan2.2":  # Wan2.2's VAE: 2x2 pixel patches in (12 channels), residual blocks, 16x spatial
        config.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                      latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    return config


def _i2v_transformer_config(kind: str, z_dim: int, t_cfg: dict, clip: str) -> dict:
    """Wan I2V transformers take noise + mask (4) + first-frame latents; Wan2.1's also CLIP tokens."""
    if kind not in I2V_KINDS:
        raise ValueError(f"unknown image-to-video kind {kind!r}; choose one of {I2V_KINDS}")
    extra = dict(in_channels=2 * z_dim + 4, out_channels=z_dim)
    if kind == "wan2.1":
        extra.update(image_dim=_CLIP_PRESETS[clip]["hidden_size"],
                     added_kv_proj_dim=t_cfg["num_attention_heads"] * t_cfg["attention_head_dim"])
    return extra


def _save_image_encoder(path: Path, clip: dict) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**clip)).save_pretrained(str(path / "image_encoder"))
    side = clip["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        str(path / "image_processor"))


def _write_scheduler_and_index(path: Path, boundary_ratio: float | None = None, expand_timesteps: bool = False,
                               i2v: str | None = None) -> None:
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": _diffusers_version(),
        "boundary_ratio": boundary_ratio,
        "expand_timesteps": expand_timesteps,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if boundary_ratio is not None else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if i2v is not None:
        with_encoder = i2v == "wan2.1"
        index.update(_class_name="WanImageToVideoPipeline",
                     image_encoder=["transformers", "CLIPVisionModel"] if with_encoder else [None, None],
                     image_processor=["transformers", "CLIPImageProcessor"] if with_encoder else [None, None])
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
