"""What sampling during training costs (`[sample]`, issue #14): seconds per sample video next to
seconds per training step, measured on the user's path -- the trainer (`python -m engine.trainer`,
one process) drawing samples at its saves -- and read back from the run's metrics.jsonl.

    python bench/sampling.py                      # CPU: the embedded demo model, 64x64x17 clips
    python bench/sampling.py --case wan1.3b       # GPU: random-weight Wan2.1-1.3B of real shape

The demo case trains on demo-world clips (batch 4) and samples two held-out prompts at 64x64x17, 20
steps, guidance 5 (the demo preset's settings), scored by the demo evaluator. The wan1.3b case builds a
random-weight Wan2.1-1.3B (real transformer and VAE shapes, engine.families.wan_random) on the GPU,
trains on four 480x832x33 clips (batch 1, bf16, LoRA rank 32, the fast performance options) and
samples one prompt at --sample-size (default 832x480x33) with --sample-steps (default 30), guidance 5.
Each case saves and samples every --save-every steps. Prints one JSON line: s/step (median, sampling
excluded, as the trainer reports it), seconds per sample video and per sampled save, the share of the
run's wall time spent sampling, and on a GPU the peak memory before and after the first sample.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEMO_PROMPTS = ["a purple star moving right on a white background", "a purple star moving left on a black background"]
WAN_PROMPT = "a red square moving right across a colorful gradient"
FAST = {"attention_backend": "cudnn", "checkpointing": "save_attention", "lora_compute_dtype": "activation"}


def demo_config(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from engine.demo.world import sample_specs, write_dataset

    clips = root / "clips"
    write_dataset(clips, sample_specs(8, seed=3))
    return {
        "output_dir": str(root / "out"), "cache_dir": str(root / "cache"), "epochs": 1000, "max_steps": args.steps,
        "micro_batch_size_per_gpu": 4, "warmup_steps": 0, "save_every_n_steps": args.save_every, "seed": 42,
        "model": {"type": "wan", "ckpt_path": "demo", "dtype": "float32"},
        "adapter": {"type": "lora", "rank": 16, "dtype": "float32"},
        "optimizer": {"type": "adamw", "lr": 2e-3},
        "dataset": {"resolutions": [64], "enable_ar_bucket": False, "frame_buckets": [17],
                    "directory": [{"path": str(clips), "num_repeats": 1}]},
        "sample": {"prompts": DEMO_PROMPTS, "seeds": [0], "steps": args.sample_steps or 20, "guidance_scale": 5.0},
    }


def wan_config(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from engine.families.wan_random import build_real_shape_wan
    from engine.inference.export import write_mp4

    model = build_real_shape_wan(root / "wan13b_random", "1.3B", device="cuda")
    clips = root / "clips"
    clips.mkdir()
    ys, xs = np.mgrid[0:480, 0:832]
    for index in range(4):  # a colored square crossing a gradient, as tests/gpu/test_real_shape.py
        video = np.empty((33, 480, 832, 3), np.uint8)
        video[..., 0], video[..., 1], video[..., 2] = xs * 255 // 832, ys * 255 // 480, 96
        for f in range(33):
            video[f, 200:300, 40 + f * 21:140 + f * 21] = (255, 40 * index, 0)
        write_mp4(video, clips / f"clip{index}.mp4", fps=16)
        (clips / f"clip{index}.txt").write_text(f"a square moving right, clip {index}")
    width, height, frames = (int(v) for v in args.sample_size.split("x"))
    return {
        "output_dir": str(root / "out"), "cache_dir": str(root / "cache"), "epochs": 1000, "max_steps": args.steps,
        "micro_batch_size_per_gpu": 1, "warmup_steps": 0, "save_every_n_steps": args.save_every, "seed": 3,
        "activation_checkpointing": True,
        "model": {"type": "wan", "ckpt_path": str(model), "dtype": "bfloat16"},
        "adapter": {"type": "lora", "rank": 32, "dtype": "float32"},
        "optimizer": {"type": "adamw", "lr": 1e-4},
        "performance": FAST,
        # 640: the 848x480 bucket (no multiple of 16 buckets 832x480 exactly), 33 frames.
        "dataset": {"resolutions": [640], "enable_ar_bucket": True, "min_ar": 1.7, "max_ar": 1.8,
                    "num_ar_buckets": 1, "frame_buckets": [33], "directory": [{"path": str(clips), "num_repeats": 1}]},
        "sample": {"prompts": [WAN_PROMPT], "seeds": [0], "width": width, "height": height, "num_frames": frames,
                   "steps": args.sample_steps or 30, "guidance_scale": 5.0},
    }


def run_trainer(config: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    import tomli_w

    path = root / "run.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    run_dir = root / "run"
    env = {k: v for k, v in os.environ.items() if k != "STUDIO_HOME"}
    done = subprocess.run([sys.executable, "-m", "engine.trainer", "--config", str(path), "--run-dir", str(run_dir)],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"trainer failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(events: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """s/step (median, first two steps left out: warm-up), seconds per sample video and save, the
    share of the training's wall time (from its start event, the latent cache done) spent sampling,
    peak memory before and after the first sample."""
    per_step = config["micro_batch_size_per_gpu"]
    steps = [e for e in events if e.get("event") == "step"]
    samples = [e for e in events if e.get("event") == "sample"]
    warnings = [e["message"] for e in events if e.get("event") == "warning" and "sampl" in e.get("message", "")]
    if not samples:
        sys.exit(f"no sample events; warnings: {warnings}")
    step_s = [per_step / e["samples_per_s"] for e in steps[2:] or steps]
    sample_s = sum(e["seconds"] for e in samples)
    videos = sum(len(e["videos"]) for e in samples)
    started = next(e["time"] for e in events if e.get("event") == "start")  # after the latent cache
    wall = events[-1]["time"] - started
    first_sample_step = samples[0]["step"]
    peaks_before = [e["peak_mem_gib"] for e in steps if "peak_mem_gib" in e and e["step"] <= first_sample_step]
    peaks_after = [e["peak_mem_gib"] for e in steps if "peak_mem_gib" in e and e["step"] > first_sample_step]
    from engine.media import probe_video

    s, drawn = config["sample"], probe_video(samples[0]["videos"][0]["file"])
    result = {
        "s_per_step": round(statistics.median(step_s), 3),
        "steps": len(steps),
        "sample": {"size": f"{drawn.width}x{drawn.height}x{drawn.frames}", "steps": s["steps"],
                   "guidance": s["guidance_scale"], "videos_per_save": len(samples[0]["videos"])},
        "s_per_video": round(sample_s / videos, 2),
        "s_per_sampled_save": round(sample_s / len(samples), 2),
        "saves_sampled": len(samples),
        "sampling_share_of_wall": round(sample_s / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 1),
        "scores_last_save": samples[-1].get("scores") or {},
    }
    if peaks_before or peaks_after:
        result["peak_gib_training"] = max(peaks_before) if peaks_before else None
        result["peak_gib_with_sampling"] = max(peaks_after) if peaks_after else None
    return result


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("demo", "wan1.3b"), default="demo")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    parser.add_argument("--save-every", type=int, default=4, help="save and sample every N steps (default 4)")
    parser.add_argument("--sample-steps", type=int, default=None, help="denoising steps (demo 20, wan1.3b 30)")
    parser.add_argument("--sample-size", default="832x480x33", help="wan1.3b: WIDTHxHEIGHTxFRAMES of each sample")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the run (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        config = demo_config(root, args) if args.case == "demo" else wan_config(root, args)
        setup_s = time.monotonic() - started
        result = summarize(run_trainer(config, root), config)
    print(json.dumps({"bench": "sampling", "case": args.case, "machine": machine(),
                      "train": {"batch": config["micro_batch_size_per_gpu"],
                                "clips": "64x64x17" if args.case == "demo" else "848x480x33"},
                      **result, "setup_s": round(setup_s, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
