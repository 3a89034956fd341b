"""The command line of the demo model build (`python -m engine.demo.build_model ...`): stage selection,
presets and overrides, over the stages in engine.demo.build_model."""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from engine.demo import world
from engine.demo.build_model import (PRESETS, STAGES, BuildSettings, stage_export, stage_latents, stage_text,
                                     stage_transformer, stage_vae)

log = logging.getLogger(__name__)


def run(stages: list[str], work: Path, out: Path | None, settings: BuildSettings, device: torch.device) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for stage in stages:
        started = time.time()
        log.info("stage %s on %s", stage, device)
        if stage == "text":
            stage_text(work, settings)
        elif stage == "vae":
            stage_vae(work, settings, device)
        elif stage == "latents":
            stage_latents(work, settings, device)
        elif stage == "transformer":
            stage_transformer(work, settings, device)
        elif stage == "export":
            if out is None:
                raise SystemExit("stage export needs --out")
            stage_export(work, out)
        timings[stage] = {"seconds": round(time.time() - started, 1), "device": str(device)}
        timings_path.write_text(json.dumps({**timings, "settings": asdict(settings)}, indent=2))
    return timings


def main(argv: list[str] | None = None) -> int:
    from engine.demo import build_model

    parser = argparse.ArgumentParser(description=build_model.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="diffusers folder to write (e.g. assets/demo_model)")
    parser.add_argument("--work-dir", type=Path, default=Path(".demo_build"), help="checkpoints and caches")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    overrides = {  # flag -> BuildSettings field (each overrides the preset)
        "--transformer-steps": ("transformer_steps", int, None),
        "--transformer-batch": ("transformer_batch", int, None),
        "--transformer-lr": ("transformer_lr", float, "lower when continuing from --init"),
        "--transformer-minutes": ("transformer_minutes", float, "wall-clock budget of the transformer stage"),
        "--first-frames-weight": ("first_frames_weight", float, "transformer loss weight of latent frames 0-1"),
        "--unnamed-colors": ("unnamed_colors", float, "share of the transformer's clips in random colors the "
                                                      "caption does not name (none near the held-out color)"),
        "--focus": ("focus", str, "caption words (e.g. 'blue star') whose clips get --focus-share of each batch"),
        "--focus-share": ("focus_share", float, "share of each transformer batch drawn from --focus clips"),
        "--vae-steps": ("vae_steps", int, None),
        "--vae-batch": ("vae_batch", int, None),
        "--vae-lr": ("vae_lr", float, None),
        "--vae-clip-frames": ("vae_clip_frames", int, "4k+1; train on the length you generate (see docs/demo.md)"),
        "--vae-minutes": ("vae_minutes", float, "wall-clock budget of the vae stage"),
        "--pool-clips": ("pool_clips", int, "number of rendered clips"),
        "--seed": ("seed", int, "the rendered pool, new weights and training noise (a new seed: fresh clips)"),
        "--init": ("init", str, "a built demo model folder: its vae/transformer weights are the starting point"),
    }
    for flag, (field, kind, text) in overrides.items():
        parser.add_argument(flag, type=kind, dest=field, help=text or "override the preset")
    parser.add_argument("--keep-latent-stats", action="store_true",
                        help="keep the VAE's latents_mean/std (continuing from --init weights)")
    parser.add_argument("--vae-decoder-only", action="store_true",
                        help="vae stage: train the decoder alone (the latents, and the transformer's training on "
                             "them, stay valid)")
    parser.add_argument("--vae-equal-contrast", action="store_true",
                        help="vae stage: scale each clip's error by its inverse shape/background contrast")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = {field: getattr(args, field) for field, _, _ in overrides.values() if getattr(args, field) is not None}
    settings = replace(PRESETS[args.preset], **chosen, keep_latent_stats=args.keep_latent_stats,
                       vae_decoder_only=args.vae_decoder_only, vae_equal_contrast=args.vae_equal_contrast)
    if not 0 <= settings.unnamed_colors <= 1:
        parser.error(f"--unnamed-colors: a share of the clips, from 0 to 1, got {settings.unnamed_colors}")
    if not 0 <= settings.focus_share < 1 or (settings.focus_share > 0) != bool(settings.focus.strip()):
        parser.error("--focus and --focus-share go together: caption words and a share from 0 to below 1, got "
                     f"{settings.focus!r} and {settings.focus_share}")
    frames = settings.vae_clip_frames
    if frames % 4 != 1 or not 1 <= frames <= world.NUM_FRAMES:
        parser.error(f"--vae-clip-frames: must be 4k+1 and at most {world.NUM_FRAMES}, got {frames}")
    init = Path(settings.init) if settings.init else None
    missing = [n for n in ("vae", "transformer") if init and not (init / n / "config.json").is_file()]
    if missing:
        parser.error(f"--init {init}: no {' or '.join(missing)} folder with a config.json (a built demo model?)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    timings = run(stages, args.work_dir, args.out, settings, torch.device(args.device))
    print(json.dumps(timings))
    return 0
