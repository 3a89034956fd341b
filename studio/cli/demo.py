"""`studio demo [--prepare | --generate PROMPT [--out FILE]]`: the embedded shapes-world demo.

--prepare   create the demo LoRA dataset in the data directory and write demo_lora.toml filled in
            for it (then: studio train <that file>, with the same --home)
--generate  generate one clip with the demo model, save it as mp4 and print what the evaluator sees
no option   --prepare, then show where everything is
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.inference.request import DEMO_DEFAULTS
from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the embedded demo: prepare its LoRA dataset or generate a clip")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--prepare", action="store_true", help="create the demo LoRA dataset and config")
    action.add_argument("--generate", metavar="PROMPT",
                        help="e.g. 'a red circle moving left on a black background'")
    parser.add_argument("--out", type=Path, default=Path("demo.mp4"), help="mp4 written by --generate")
    parser.add_argument("--lora", type=Path, help="LoRA .safetensors applied by --generate")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of --generate")
    parser.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"], help="denoising steps of --generate")
    parser.add_argument("--guidance", type=float, default=DEMO_DEFAULTS["guidance_scale"],
                        help="guidance scale of --generate")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    if args.generate:
        return _generate(args)
    config_path = _prepare(settings.home)
    if not args.prepare:
        from engine.models import resolve_model

        print(f"demo model:  {resolve_model('demo')}")
        print(f"try:        {args.hint} demo --generate 'a red circle moving left on a black background'")
    print(f"then train: {args.hint} train {config_path}")  # the same --home: the job lands beside its dataset
    return 0


def _prepare(home: Path) -> Path:
    from engine.demo.setup import demo_lora_config_text, ensure_demo_assets

    dataset = ensure_demo_assets(home)
    config_path = Path(home) / "demo_lora.toml"
    config_path.write_text(demo_lora_config_text(home), encoding="utf-8")
    print(f"demo dataset: {dataset} ({len(list(dataset.glob('*.mp4')))} clips)")
    print(f"demo config:  {config_path}")
    return config_path


def _generate(args: argparse.Namespace) -> int:
    from engine.demo.evaluate import read_clip
    from engine.demo.sampling import SampleSettings, generate_clip, load_demo_pipeline
    from engine.demo.world import CaptionError, parse_caption, write_clip_mp4

    try:
        parse_caption(args.generate)
    except CaptionError as exc:
        print(f"warning: {exc}; the demo model only knows shapes-world captions", file=sys.stderr)
    from engine.threads import ComputeMark, apply_thread_policy

    apply_thread_policy("inference")  # the same threads as the inference worker: comparable numbers
    pipe = load_demo_pipeline("demo", lora=args.lora)
    started = time.time()
    with ComputeMark("inference"):  # a studio trainer on this CPU gives back its extra cores meanwhile
        frames = generate_clip(pipe, args.generate, args.seed,
                               SampleSettings(steps=args.steps, guidance_scale=args.guidance))
    seconds = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_clip_mp4(frames, args.out)
    reading = read_clip(frames)
    print(json.dumps({"video": str(args.out), "seconds": round(seconds, 2), "seen": reading.__dict__}))
    return 0
