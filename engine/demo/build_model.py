"""Build the embedded demo model: a tiny pipeline of the real Wan2.1 architecture, trained on the shapes world.

Stages (each resumable, all state in --work-dir):
  text        word-level tokenizer from the caption vocabulary + a small random UMT5 encoder (kept frozen)
  vae         AutoencoderKLWan (4x spatial, 4x temporal) trained to reconstruct shapes-world clips
  latents     encode a pool of base-split clips, record per-channel latent mean/std in the VAE config
  transformer WanTransformer3DModel trained with Wan's flow-matching objective (EMA weights kept)
  export      WanPipeline(...).save_pretrained(out): loads with plain WanPipeline.from_pretrained

The held-out color (purple) never appears in the transformer's data. The VAE sees random
foreground/background colors so it reconstructs any color, like a real video VAE.

    python -m engine.demo.build_model --out assets/demo_model --preset cpu
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.demo import world
from engine.demo.build_parts import (TEXT_DIM, build_text_encoder, build_tokenizer, compose, encode_captions,
                                     load_checkpoint, lr_factor, palette_colors, render_pool, save_checkpoint,
                                     time_budget_end)

log = logging.getLogger(__name__)

# 16 latent channels and base width 32 (about 10 MB): the earlier 8-channel, width-24 VAE rounded
# corners and blurred small shapes (its own reconstructions read the right shape about half the time).
Z_DIM = 16
FLOW_SHIFT = 2.0
SILHOUETTE_WEIGHT = 4.0  # extra reconstruction weight on the shape and the pixels around it
FULL_CONTRAST = 200.0  # RGB distance between shape and background from which a clip's error counts as is

VAE_CONFIG = dict(
    base_dim=32,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    scale_factor_temporal=4,
    scale_factor_spatial=4,
)
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
SCHEDULER_CONFIG = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=FLOW_SHIFT
)
STAGES = ("text", "vae", "latents", "transformer", "export")


@dataclass(frozen=True)
class BuildSettings:
    seed: int = 0
    pool_clips: int = 2000
    vae_steps: int = 600
    vae_batch: int = 4
    vae_lr: float = 1e-3
    # Train on the clip length the pipeline generates: a causal VAE trained on 9-frame crops reconstructed
    # frames 0-8 well and diverged from frame 9 on (its receptive field outgrows the crop).
    vae_clip_frames: int = world.NUM_FRAMES
    transformer_steps: int = 3000
    transformer_batch: int = 16
    transformer_lr: float = 5e-4
    caption_dropout: float = 0.1
    # Loss weight of the first two latent frames (video frames 0-4): their normalized latents are smaller
    # (std 0.80 / 0.84 against 0.95-1.11 later) and held-in shapes failed there most (docs/demo.md).
    first_frames_weight: float = 1.0
    # Share of the transformer's clips drawn in a random color that the caption does not name ("a star
    # moving left on a black background"), none near the held-out color: the transformer learns to draw
    # every shape in any color, so a LoRA that teaches a new color word does not also have to teach the
    # model to draw shapes in that color (docs/demo.md).
    unnamed_colors: float = 0.0
    # Share of each transformer batch drawn from the pool's clips whose caption contains `focus` (e.g.
    # "blue star": the combination the base model draws worst, and the color nearest the held-out one).
    focus: str = ""
    focus_share: float = 0.0
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    workers: int = 1
    vae_minutes: float = 0.0  # wall-clock budget per stage; 0 = none (stops early, saves what it has)
    transformer_minutes: float = 0.0
    keep_latent_stats: bool = False
    # Train only the VAE's decoder: the latents (and so the transformer trained on them) stay valid, while
    # the decoder learns to draw sharper shapes from them.
    vae_decoder_only: bool = False
    # Scale each clip's reconstruction error by its inverse shape/background contrast (down to 0.3 of
    # FULL_CONTRAST): the error of a lost star point grows with the contrast, so a purple star on gray
    # (110 apart) lost its points first while the same star on white (230 apart) kept them.
    vae_equal_contrast: bool = False
    init: str = ""  # a built demo model folder whose vae/transformer weights the stages start from


PRESETS: dict[str, BuildSettings] = {
    "smoke": BuildSettings(pool_clips=64, vae_steps=20, transformer_steps=30, checkpoint_every=10, ema_decay=0.9),
    "cpu": BuildSettings(),
    "gpu": BuildSettings(
        pool_clips=32000,
        vae_steps=6000,
        vae_batch=96,  # the causal VAE is launch-bound at 64x64: a larger batch costs little more per step
        transformer_steps=12000,
        transformer_batch=256,  # on a GPU a step of 256 costs 1.5x one of 64 (launch-bound model)
        transformer_lr=8e-4,
        checkpoint_every=1000,
        ema_decay=0.999,
        workers=14,
    ),
}


# ---------------------------------------------------------------- text


def stage_text(work: Path, settings: BuildSettings) -> None:
    tokenizer = build_tokenizer()
    encoder = build_text_encoder(len(tokenizer), settings.seed)
    tokenizer.save_pretrained(work / "text" / "tokenizer")
    encoder.save_pretrained(work / "text" / "text_encoder")



# ---------------------------------------------------------------- vae


def stage_vae(work: Path, settings: BuildSettings, device: torch.device) -> None:
    from diffusers import AutoencoderKLWan

    # Every caption, the held-out color included: like a real video VAE the codec has seen all kinds of
    # pictures; only the transformer must not know the held-out concept. A VAE trained on circles,
    # squares and triangles alone rounded a star's points (its reconstructions never read as a star),
    # so no LoRA could ever draw one.
    coverage, specs = _load_pool(work, settings, every_shape=True)  # before CUDA starts: the pool forks
    # The whole pool lives on the device: composing batches on the host cost more than the VAE step.
    pool = torch.from_numpy(np.ascontiguousarray(coverage)).to(device)
    torch.manual_seed(settings.seed + 1)
    vae = _initial(AutoencoderKLWan, work, "vae", VAE_CONFIG, settings).to(device).train()
    if settings.vae_decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.vae_lr, weight_decay=0.0)
    ckpt_path = work / "vae_ckpt.pt"
    start = _resume(ckpt_path, vae, optimizer)
    started, deadline = time.time(), time_budget_end(settings.vae_minutes)
    generator = torch.Generator().manual_seed(settings.seed + 2 + start)
    fg_palette, bg_palette = palette_colors(specs)
    for step in range(start, settings.vae_steps):
        video, weight = _vae_batch(pool, fg_palette, bg_palette, settings, generator)
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * lr_factor(step, settings.vae_steps, started, settings.vae_minutes)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(not settings.vae_decoder_only):
                latents = vae.encode(video).latent_dist.mode()
            recon = vae.decode(latents).sample.float()
        # A deterministic autoencoder: decoding the posterior mean is what the pipeline does, and sampling
        # from a still-wide posterior early in training taught the decoder to blur and mix colors.
        # The small penalty keeps the latents' scale in check, as the KL term would.
        # The shape is a small part of each frame: weighting its pixels and their neighbours keeps the
        # corners and tips that an unweighted loss traded for a cleaner background.
        error = (recon - video) * weight
        loss = error.abs().mean() + error.pow(2).mean() + 1e-4 * latents.float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            log.info("vae step %d/%d loss %.4f", step + 1, settings.vae_steps, loss.item())
        out_of_time = time.time() > deadline
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.vae_steps or out_of_time:
            save_checkpoint(ckpt_path, {"step": step + 1, "model": vae.state_dict(), "optimizer": optimizer.state_dict()})
        if out_of_time:
            log.info("vae: time budget reached at step %d", step + 1)
            break
    vae.eval().to("cpu").save_pretrained(work / "vae")


def _vae_batch(pool: torch.Tensor, fg_palette: torch.Tensor, bg_palette: torch.Tensor, settings: BuildSettings,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of clips (B, 3, T, H, W) on the pool's device, half in palette colors, half in random colors
    (purple included), and its per-pixel loss weight (B, 1, T, H, W)."""
    batch = settings.vae_batch
    index = torch.randint(len(pool), (batch,), generator=generator)
    fg, bg = fg_palette[index].clone(), bg_palette[index].clone()
    random_colors = torch.rand(batch, generator=generator) < 0.5
    fg[random_colors] = torch.rand(int(random_colors.sum()), 3, generator=generator) * 255
    bg[random_colors] = torch.rand(int(random_colors.sum()), 3, generator=generator) * 255
    first = int(torch.randint(pool.shape[1] - settings.vae_clip_frames + 1, (1,), generator=generator))
    crop = pool[index.to(pool.device), first : first + settings.vae_clip_frames]
    weight = _silhouette_weight(crop)
    if settings.vae_equal_contrast:
        weight = weight * _contrast_scale(fg, bg).to(pool.device).view(-1, 1, 1, 1, 1)
    return compose(crop, fg.to(pool.device), bg.to(pool.device)), weight


def _contrast_scale(fg: torch.Tensor, bg: torch.Tensor, floor: float = 0.3) -> torch.Tensor:
    """Per clip: 1 at FULL_CONTRAST or more, up to 1 / floor for a faint shape (a shape in nearly the
    background's color gets no more than that: there is little to see)."""
    contrast = (fg - bg).norm(dim=1) / FULL_CONTRAST
    return 1.0 / contrast.clamp(min=floor, max=1.0)


def _silhouette_weight(coverage: torch.Tensor) -> torch.Tensor:
    """1 on the background, 1 + SILHOUETTE_WEIGHT on the shape and within 2 pixels of its edge."""
    near_shape = torch.nn.functional.max_pool2d(coverage.float().flatten(0, 1).unsqueeze(1), 5, stride=1, padding=2)
    near_shape = near_shape.view(coverage.shape).unsqueeze(1)
    return 1.0 + SILHOUETTE_WEIGHT * near_shape


def _initial(model_class, work: Path, name: str, config: dict, settings: BuildSettings) -> torch.nn.Module:
    """Fresh weights, or <init>/<name> (--init) or work/init/<name> when present: continue earlier weights."""
    for init in ([Path(settings.init) / name] if settings.init else []) + [work / "init" / name]:
        if (init / "config.json").is_file():
            log.info("%s starts from %s", name, init)
            return model_class.from_pretrained(init)
    return model_class(**config)


def _resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema=None) -> int:
    state = load_checkpoint(path)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    log.info("resumed %s at step %d", path.name, state["step"])
    return int(state["step"])


def _load_pool(work: Path, settings: BuildSettings, *, every_shape: bool = False
               ) -> tuple[np.ndarray, list[world.ClipSpec]]:
    """The rendered pool (base split; every_shape: every caption, for the VAE) is cached in the work dir
    so every stage and every resume sees the same clips."""
    split = None if every_shape else False
    path = work / ("vae_pool.npy" if every_shape else "pool.npy")
    specs = world.sample_specs(settings.pool_clips, settings.seed, held_out=split)
    if path.exists():
        coverage = np.load(path, mmap_mode="r")
        if len(coverage) == len(specs):
            return coverage, specs
    started = time.time()
    coverage, specs = render_pool(settings.pool_clips, settings.seed, settings.workers, held_out=split)
    np.save(path, coverage)
    log.info("rendered %d clips in %.1f s", len(specs), time.time() - started)
    return np.load(path, mmap_mode="r"), specs


# ---------------------------------------------------------------- latents


def stage_latents(work: Path, settings: BuildSettings, device: torch.device) -> None:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(work / "vae").to(device).eval()
    coverage, specs = _load_pool(work, settings)
    fg, bg = palette_colors(specs)
    unnamed = unnamed_color_clips(fg, bg, settings.unnamed_colors, settings.seed)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(specs), 64):
            stop = min(start + 64, len(specs))
            video = compose(torch.from_numpy(np.asarray(coverage[start:stop])), fg[start:stop], bg[start:stop])
            chunks.append(vae.encode(video.to(device)).latent_dist.mode().cpu())
    latents = torch.cat(chunks)
    if settings.keep_latent_stats:  # continuing a build: the transformer was trained on these stats
        mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    else:
        mean = latents.mean(dim=(0, 2, 3, 4))
        std = latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        vae.to("cpu").save_pretrained(work / "vae")
    normalized = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    texts = [s.caption.text(with_color=not u) for s, u in zip(specs, unnamed.tolist())]
    prompts = sorted(set(texts))
    caption_index = torch.tensor([prompts.index(t) for t in texts])
    embeds = encode_captions(work, prompts + [""])  # the last row is the empty (unconditional) prompt
    torch.save({"latents": normalized, "caption_index": caption_index, "embeds": embeds, "prompts": prompts},
               work / "latents.pt")


def unnamed_color_clips(fg: torch.Tensor, bg: torch.Tensor, share: float, seed: int,
                        min_held_out_distance: float = 110.0, min_contrast: float = 90.0) -> torch.Tensor:
    """Recolor about `share` of the clips in place with random foreground colors at least
    `min_held_out_distance` RGB from the held-out color (its evaluator reading needs 60) and
    `min_contrast` from the clip's background; returns the mask of recolored clips."""
    generator = torch.Generator().manual_seed(seed + 7)
    chosen = torch.rand(len(fg), generator=generator) < share
    held_out = torch.tensor(world.COLORS[world.HELD_OUT_COLOR], dtype=torch.float32)
    for index in chosen.nonzero().flatten().tolist():
        while True:
            color = torch.rand(3, generator=generator) * 255
            if (color - held_out).norm() >= min_held_out_distance and (color - bg[index]).norm() >= min_contrast:
                fg[index] = color
                break
    return chosen


# ---------------------------------------------------------------- transformer


def stage_transformer(work: Path, settings: BuildSettings, device: torch.device) -> None:
    from diffusers import WanTransformer3DModel

    data = torch.load(work / "latents.pt")
    latents, caption_index = data["latents"].to(device), data["caption_index"].to(device)
    embeds = data["embeds"].to(device)
    empty = embeds.shape[0] - 1
    torch.manual_seed(settings.seed + 3)
    model = _initial(WanTransformer3DModel, work, "transformer", TRANSFORMER_CONFIG, settings).to(device).train()
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(settings.ema_decay)
    )
    optimizer = torch.optim.AdamW(_decay_groups(model, 0.01), lr=settings.transformer_lr)
    ckpt_path = work / "transformer_ckpt.pt"
    start = _resume(ckpt_path, model, optimizer, ema)
    started, deadline = time.time(), time_budget_end(settings.transformer_minutes)
    generator = torch.Generator(device=device).manual_seed(settings.seed + 4 + start)
    batch = settings.transformer_batch
    frame_weights = _frame_weights(latents.shape[2], settings.first_frames_weight, device)
    focus = focus_indices(data, settings).to(device)
    focused = round(batch * settings.focus_share)
    for step in range(start, settings.transformer_steps):
        index = torch.randint(len(latents), (batch,), generator=generator, device=device)
        if focused:
            index[:focused] = focus[torch.randint(len(focus), (focused,), generator=generator, device=device)]
        x0 = latents[index]
        text = caption_index[index].clone()
        text[torch.rand(batch, generator=generator, device=device) < settings.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=generator, device=device)
        sigma = _sample_sigmas(batch, generator, device)
        noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        for group in optimizer.param_groups:
            group["lr"] = settings.transformer_lr * lr_factor(
                step, settings.transformer_steps, started, settings.transformer_minutes
            )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(noisy, timestep=sigma * 1000, encoder_hidden_states=embeds[text], return_dict=False)[0]
        loss = (frame_weights * (prediction.float() - (noise - x0)).pow(2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update_parameters(model)
        if (step + 1) % 100 == 0:
            log.info("transformer step %d/%d loss %.4f", step + 1, settings.transformer_steps, loss.item())
        out_of_time = time.time() > deadline
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.transformer_steps or out_of_time:
            save_checkpoint(
                ckpt_path,
                {"step": step + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()},
            )
        if out_of_time:
            log.info("transformer: time budget reached at step %d", step + 1)
            break
    ema.module.eval().to("cpu").save_pretrained(work / "transformer")


def focus_indices(data: dict, settings: BuildSettings) -> torch.Tensor:
    """Pool clips whose caption contains settings.focus (all clips when there is no focus)."""
    if not settings.focus_share:
        return torch.arange(len(data["caption_index"]))
    if "prompts" not in data:
        raise SystemExit("--focus needs latents.pt from the current latents stage: run the latents stage again")
    matching = [i for i, c in enumerate(data["caption_index"].tolist()) if settings.focus in data["prompts"][c]]
    if not matching:
        raise SystemExit(f"--focus {settings.focus!r} matches no caption of the pool (e.g. 'blue star')")
    return torch.tensor(matching)


def _frame_weights(frames: int, first_two: float, device: torch.device) -> torch.Tensor:
    """Per-latent-frame loss weights, shaped to broadcast over (batch, channel, frame, h, w) and
    normalized to mean 1 so the loss scale (and the learning rate that suits it) stays the same."""
    weights = torch.ones(frames, device=device)
    weights[:2] = first_two
    return (weights / weights.mean()).view(1, 1, frames, 1, 1)


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying norm gains and biases slows how sharp attention can get."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def _sample_sigmas(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Half uniform, half logit-normal (Wan trainers' default): all noise levels, more weight mid-range."""
    uniform = torch.rand(batch, generator=generator, device=device)
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    pick = torch.rand(batch, generator=generator, device=device) < 0.5
    return torch.where(pick, uniform, logit_normal).clamp(1e-3, 1 - 1e-3)


# ---------------------------------------------------------------- export


def stage_export(work: Path, out: Path) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    pipe = WanPipeline(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(work / "text" / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(work / "text" / "text_encoder"),
        transformer=WanTransformer3DModel.from_pretrained(work / "transformer"),
        vae=AutoencoderKLWan.from_pretrained(work / "vae"),
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for config in out.glob("*/config.json"):  # the build machine's work paths have no place in the model
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("saved the demo pipeline to %s", out)


if __name__ == "__main__":  # the command line lives in engine.demo.build_cli
    from engine.demo.build_cli import main

    raise SystemExit(main())
