"""Random-weight Wan models built locally (no downloads): a complete tiny WanPipeline folder for
tests, and transformers of the real Wan2.1 shapes for GPU benchmarks."""

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
    "build_tokenizer",
    "random_transformer",
    "transformer_config",
]

# Wan2.1 shapes from the published configs; "tiny"/"small" are ours for CPU tests and demos.
TRANSFORMER_PRESETS: dict[str, dict] = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32),
    "small": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=4, text_dim=64, freq_dim=64),
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096, freq_dim=256),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256),
}

_TEXT_ENCODER_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1),
    "small": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2),
}

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
                     vae: str = "wan2.1") -> Path:
    """Write a complete diffusers WanPipeline folder with random weights at `path`; returns it.

    "tiny" loads and runs a training step in about a second on a CPU core. `transformer_preset`
    ("1.3B", "14B") swaps in a transformer of real shape (with a text encoder of matching width)
    for GPU runs of the whole trainer. A `boundary_ratio` makes it a Wan2.2 A14B-style pair of
    experts: `transformer` (high noise, t >= boundary) and `transformer_2` (low noise), each with
    its own random weights, and the ratio in model_index.json as Wan2.2's own folders have it.
    `vae="wan2.2"` makes it a Wan2.2 TI2V-5B-style model: the 48-channel VAE that patchifies 2x2 and
    compresses 16x16 spatially (32 px per token with the transformer's patch), a 48-channel transformer
    and per-token timesteps (`expand_timesteps`) at inference.
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
    transformer = WanTransformer3DModel(**t_cfg).to(transformer_dtype)
    transformer.save_pretrained(str(path / "transformer"))
    del transformer
    if boundary_ratio is not None:  # the low-noise expert: same shape, its own weights
        WanTransformer3DModel(**t_cfg).to(transformer_dtype).save_pretrained(str(path / "transformer_2"))

    AutoencoderKLWan(**_vae_config(vae, preset)).save_pretrained(str(path / "vae"))

    _write_scheduler_and_index(path, boundary_ratio, expand_timesteps=vae == "wan2.2")
    logger.info("built random Wan (%s) at %s", preset, path)
    return path


REAL_SHAPE_DESCRIPTION = "random Wan2.1 transformer shape (2-layer 4096-wide text encoder, Wan2.1 VAE)"


def build_real_shape_wan(path: str | Path, transformer_preset: str = "1.3B", device: str = "cuda") -> Path:
    """A WanPipeline folder whose transformer and VAE have the real Wan2.1 shapes (random weights).

    The text encoder keeps UMT5-XXL's width (4096) but only 2 layers: it runs once per prompt (cached
    for training), so the time of what matters (denoising, VAE encode/decode) is the real model's."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    tokenizer = build_tokenizer(path / "tokenizer")
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    text_encoder.to(torch.bfloat16).save_pretrained(str(path / "text_encoder"))
    del text_encoder
    random_transformer(transformer_preset, device=device, dtype=torch.bfloat16).save_pretrained(
        str(path / "transformer"))
    with torch.device(device):
        vae = AutoencoderKLWan()  # defaults = the Wan2.1 VAE (base_dim 96, z_dim 16, dim_mult 1,2,4,4)
    vae.save_pretrained(str(path / "vae"))
    del vae
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    _write_scheduler_and_index(path)
    logger.info("built real-shape random Wan (%s) at %s", transformer_preset, path)
    return path


_VAE_Z_DIM = {"wan2.1": 16, "wan2.2": 48}


def _vae_config(vae: str, preset: str) -> dict:
    if vae not in _VAE_Z_DIM:
        raise ValueError(f"unknown Wan VAE {vae!r}; choose one of {sorted(_VAE_Z_DIM)}")
    config = dict(z_dim=_VAE_Z_DIM[vae], **_VAE_PRESETS[preset])
    if vae == "wan2.2":  # Wan2.2's VAE: 2x2 pixel patches in (12 channels), residual blocks, 16x spatial
        config.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                      latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    return config


def _write_scheduler_and_index(path: Path, boundary_ratio: float | None = None, expand_timesteps: bool = False) -> None:
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
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
