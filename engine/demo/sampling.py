"""Generate shapes-world clips with a Wan pipeline and score them with the pixel evaluator.

    python -m engine.demo.sampling --model assets/demo_model --count 24 [--held-out] [--lora FILE]
                                   [--step-cache 0 0.1 0.2]   # accuracy and speed with First Block Cache
    python -m engine.demo.sampling --reconstruct [--held-out]  # the VAE alone: ground truth encoded + decoded
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.demo import world
from engine.demo.evaluate import ClipScore, accuracy, accuracy_by, evaluate_clip
from engine.inference.request import DEMO_DEFAULTS
from engine.inference.speed import set_step_cache

log = logging.getLogger(__name__)

DEFAULT_STEPS = DEMO_DEFAULTS["steps"]
DEFAULT_GUIDANCE = DEMO_DEFAULTS["guidance_scale"]


@dataclass(frozen=True)
class SampleSettings:
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    width: int = world.WIDTH
    height: int = world.HEIGHT
    num_frames: int = world.NUM_FRAMES


def load_demo_pipeline(model: str = "demo", *, lora: Path | None = None, device: str = "cpu"):
    """WanPipeline.from_pretrained on a resolved model name (same path as real Wan models), optional LoRA."""
    from diffusers import WanPipeline

    from engine.models import resolve_model

    pipe = WanPipeline.from_pretrained(str(resolve_model(model))).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def evaluation_prompts(count: int, *, held_out: bool, seed: int = 1234) -> list[str]:
    """A fixed, seed-shuffled list of prompts from one split, balanced so that a weak combination cannot
    hide in an average: consecutive prompts go round the split's shapes, and each shape round its colors
    (24 held-in prompts: every shape 6 times, every shape x color at least once). Cycles when count
    exceeds the split."""
    captions = world.all_captions(held_out=held_out)
    shuffled = [captions[i] for i in np.random.default_rng(seed).permutation(len(captions))]
    queues: dict[str, dict[str, list[world.Caption]]] = {}
    for caption in shuffled:
        queues.setdefault(caption.shape, {}).setdefault(caption.color, []).append(caption)
    balanced: list[world.Caption] = []
    while len(balanced) < len(shuffled):
        for by_color in queues.values():
            color = next((c for c in by_color if by_color[c]), None)
            if color is not None:
                balanced.append(by_color[color].pop(0))
                by_color[color] = by_color.pop(color)  # this color goes to the back of the shape's round
    return [balanced[i % len(balanced)].text() for i in range(count)]


def generate_clip(pipe, prompt: str, seed: int, settings: SampleSettings = SampleSettings()) -> np.ndarray:
    """One clip as uint8 frames (T, H, W, 3)."""
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    output = pipe(
        prompt,
        negative_prompt="",
        height=settings.height,
        width=settings.width,
        num_frames=settings.num_frames,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=torch.Generator(device=device).manual_seed(seed),
        output_type="np",
    )
    frames = np.asarray(output.frames[0])
    return np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)


def reconstruct_clip(vae, frames: np.ndarray) -> np.ndarray:
    """Ground-truth frames (T, H, W, 3) encoded and decoded by the VAE (the posterior mean, as the
    build trained it): what the VAE can represent at best, whatever the transformer draws."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
    with torch.no_grad():
        video = video.to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample[0].float().clamp(-1, 1)
    return ((decoded.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().cpu().numpy()


def score_reconstructions(vae, count: int, *, held_out: bool, seed: int = 2024) -> list[ClipScore]:
    return [evaluate_clip(reconstruct_clip(vae, world.render_clip(spec)), spec.caption.text())
            for spec in world.sample_specs(count, seed, held_out=held_out)]


def score_prompts(pipe, prompts: list[str], settings: SampleSettings = SampleSettings(), seed: int = 0) -> list[ClipScore]:
    return [evaluate_clip(generate_clip(pipe, p, seed + i, settings), p) for i, p in enumerate(prompts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="'demo' or a diffusers folder")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--lora", type=Path, help="LoRA .safetensors to load first")
    parser.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--step-cache", type=float, nargs="+", default=[0.0],
                        help="First Block Cache thresholds to compare (0 = off), as the inference worker applies it")
    parser.add_argument("--reconstruct", action="store_true",
                        help="score the VAE's reconstructions of --count ground-truth clips instead of generations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    pipe = load_demo_pipeline(args.model, lora=args.lora, device=args.device)
    if args.reconstruct:
        scores = score_reconstructions(pipe.vae, args.count, held_out=args.held_out)
        print(json.dumps({"reconstruct": True, "held_out": args.held_out, "n": len(scores), **accuracy(scores)}))
        return 0
    prompts = evaluation_prompts(args.count, held_out=args.held_out)
    for threshold in args.step_cache:
        set_step_cache(pipe.transformer, threshold)
        for guidance in args.guidance:
            started = time.time()
            scores = score_prompts(pipe, prompts, SampleSettings(steps=args.steps, guidance_scale=guidance))
            result = {"guidance": guidance, "step_cache": threshold, "held_out": args.held_out, "n": len(scores),
                      **accuracy(scores), "shape_by_shape": accuracy_by(scores, "shape", "shape")}
            result["seconds_per_clip"] = round((time.time() - started) / len(scores), 3)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
