"""Demo model quality and speed on CPU; prints ONE JSON line.

Scores come from the frame-by-frame evaluator (engine/demo/evaluate.py): base accuracy (color, shape,
motion, object present in every frame, all at once, and the share of frames with an object) on
held-in prompts balanced over shapes and colors (with shape accuracy per shape and "all" per color),
held-out "purple star" accuracy before and after the demo LoRA (trained through the real trainer:
python -m engine.trainer), the LoRA's training wall time, and one 64x64x17, 20-step generation's
wall time (threads as the inference worker's, engine/threads.py). Writes a contact sheet of
"a purple star moving right on a white background" (3 seeds; base, then with the LoRA) to
--sheet.

    python bench/demo_quality.py [--held-in 24] [--held-out 12] [--lora-steps N] [--home DIR] [--sheet PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.demo.evaluate import accuracy, accuracy_by  # noqa: E402
from engine.demo.sampling import (  # noqa: E402
    SampleSettings,
    evaluation_prompts,
    generate_clip,
    load_demo_pipeline,
    score_prompts,
)
from engine.demo.setup import demo_lora_config_text, ensure_demo_assets  # noqa: E402


def train_demo_lora(home: Path, max_steps: int | None) -> tuple[Path, float]:
    """Run examples/demo_lora.toml through the trainer program; returns (last LoRA file, wall seconds)."""
    ensure_demo_assets(home)
    text = demo_lora_config_text(home)
    if max_steps:
        text = f"max_steps = {max_steps}\n" + text
    config = home / "demo_lora.toml"
    config.write_text(text, encoding="utf-8")
    run_dir = home / "runs" / f"bench-{int(time.time())}"
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "engine.trainer", "--config", str(config), "--run-dir", str(run_dir)],
        cwd=REPO,
        env={**os.environ, "STUDIO_HOME": str(home)},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.time() - started
    loras = sorted(run_dir.glob("*/adapter_model.safetensors"), key=lambda p: p.stat().st_mtime)
    if not loras:
        raise RuntimeError(f"the trainer saved no LoRA in {run_dir}")
    return loras[-1], seconds


SHEET_PROMPT = "a purple star moving right on a white background"


def write_sheet(path: Path, pipes: list, settings: SampleSettings, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Rows: each pipeline x seed, every other frame, enlarged 3x with nearest-neighbour."""
    from PIL import Image

    from engine.media import contact_sheet

    clips = [generate_clip(pipe, SHEET_PROMPT, seed, settings) for pipe in pipes for seed in seeds]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(clips, every=2, factor=3)).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-in", type=int, default=24, help="held-in prompts to score")
    parser.add_argument("--held-out", type=int, default=12, help="held-out prompts to score")
    parser.add_argument("--lora-steps", type=int, default=None, help="override the config's length")
    parser.add_argument("--home", type=Path, default=None, help="data dir (default: a temporary one)")
    parser.add_argument("--sheet", type=Path, default=REPO / "bench" / "demo_lora_sheet.png",
                        help="contact sheet of the held-out prompt before/after the LoRA")
    args = parser.parse_args()
    from engine.threads import apply_thread_policy

    threads = apply_thread_policy("inference")
    settings = SampleSettings()
    pipe = load_demo_pipeline("demo")
    started = time.time()
    generate_clip(pipe, "a red circle moving left on a black background", 0, settings)
    generation_s = time.time() - started
    base_scores = score_prompts(pipe, evaluation_prompts(args.held_in, held_out=False), settings)
    base = accuracy(base_scores)
    held_out_prompts = evaluation_prompts(args.held_out, held_out=True)
    before = accuracy(score_prompts(pipe, held_out_prompts, settings))
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp)
        lora, lora_s = train_demo_lora(home, args.lora_steps)
        tuned = load_demo_pipeline("demo", lora=lora)
        after = accuracy(score_prompts(tuned, held_out_prompts, settings))
        write_sheet(args.sheet, [pipe, tuned], settings)
    result = {
        "bench": "demo_quality",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch threads {threads}",
        "settings": {"size": "64x64x17", "steps": settings.steps, "guidance": settings.guidance_scale},
        "base_held_in": {k: round(v, 3) for k, v in base.items()},
        "base_held_in_shape_by_shape": {k: round(v, 3) for k, v in accuracy_by(base_scores, "shape", "shape").items()},
        "base_held_in_all_by_color": {k: round(v, 3) for k, v in accuracy_by(base_scores, "color", "all").items()},
        "held_out_before": {k: round(v, 3) for k, v in before.items()},
        "held_out_after": {k: round(v, 3) for k, v in after.items()},
        "lora_train_s": round(lora_s, 1),
        "generation_s": round(generation_s, 2),
        "n_held_in": args.held_in,
        "n_held_out": args.held_out,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
