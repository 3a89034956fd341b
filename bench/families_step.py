"""Real-shape training steps of each Wan family through a studio job, one JSON line per case.

    source .gpu/setup.sh && python3 bench/families_step.py [--cases a14b_offload,ti2v_5b] [--frames 33]
                                                          [--steps 4] [--out results.jsonl]

Cases (all by default; `--cases` or the FAMILY_CASES environment variable picks a subset, in order):
  a14b_offload   Wan2.2 T2V A14B, both experts in one run, the idle expert in pinned host memory
  a14b_resident  the same with both experts on the GPU (no copies; about 28 GB more)
  ti2v_5b        Wan2.2 TI2V-5B in its image-to-video mode (48-channel VAE, clean first latent frame)
  wan21_i2v_14b  Wan2.1 I2V 14B (CLIP image tokens, first-frame latents + mask channels)
  wan22_i2v_a14b Wan2.2 I2V A14B, both experts, offload

Each case builds its model with random weights of the published shapes on the GPU
(engine.families.wan_random.build_real_shape_family; the A14B experts share one 28 GB weight file on
disk), writes one 832x480 clip (trained at 848x480, TI2V-5B at 832x480), runs
`python -m studio train --gpus N --follow` (N: `--gpu`, default 0) for `--steps` optimizer steps (activation checkpointing,
rank 32, bf16), and records from the run's events the seconds of every step (the first includes
warm-up; `s_per_step` is the median of the others), the peak GPU memory of the steps (torch's max
allocated; with offload, counted from after DeepSpeed's start-up, which holds both experts a moment),
and for two experts the expert switches in order with their times (from the trainer's log; the first
also makes the idle expert's pinned host copy). A model folder serves the cases of its family that
follow each other (a14b_offload, a14b_resident) and is deleted after them (disk). A failed case is
recorded with `ok: false` and its log tail; the others still run. `--smoke` runs the same path on a
CPU with tiny models (checks the script, measures nothing).

Measured on H200s at 33 frames (bench/RESULTS.md, "Model families"): 14B cases 4.2-4.8 s/step; peak 38 GiB
with one expert on the GPU, 65 GiB with both resident; an expert switch 0.5 s, the first of each expert
about a minute (it also pins the host copy); Wan2.1 I2V 14B 42 GiB; TI2V-5B 0.7 s/step, 12 GiB. A case
takes 2-6 minutes (building and writing up to 33 GB of weights, loading, caching, 4 steps); host memory:
the offload cases pin both experts (about 57 GB). `--gpu N` runs cases on several GPUs at once.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_common import REPO_ROOT, card_name, emit, git_commit

# case -> (family of wan_random.REAL_SHAPE_FAMILIES, [model] overrides)
CASES: dict[str, tuple[str, dict]] = {
    # boundary 0.5 with uniform t: the experts take turns often, so a few steps show switches
    "a14b_offload": ("wan22_t2v_a14b", {"experts": "both", "idle_expert": "offload", "boundary_ratio": 0.5,
                                        "timestep_sample_method": "uniform"}),
    "a14b_resident": ("wan22_t2v_a14b", {"experts": "both", "idle_expert": "resident", "boundary_ratio": 0.5,
                                         "timestep_sample_method": "uniform"}),
    "ti2v_5b": ("wan22_ti2v_5b", {"image_to_video": True}),
    "wan21_i2v_14b": ("wan21_i2v_14B", {}),
    "wan22_i2v_a14b": ("wan22_i2v_a14b", {"experts": "both", "idle_expert": "offload", "boundary_ratio": 0.5,
                                          "timestep_sample_method": "uniform"}),
}
HEIGHT, WIDTH = 480, 832  # the clip written; trained at 848x480 (16 px multiples) or 832x480 (TI2V's 32 px)
# resolution 640 with one 832:480 aspect bucket gives those sizes (bucket_sizes; as tests/gpu/test_real_shape.py)
BUCKETS = {"resolutions": [640], "enable_ar_bucket": True, "ar_buckets": [[WIDTH, HEIGHT]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=os.environ.get("FAMILY_CASES", ",".join(CASES)),
                        help=f"comma-separated subset of {', '.join(CASES)} (env FAMILY_CASES)")
    parser.add_argument("--frames", type=int, default=33, help="clip length, 4k+1 (default 33)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per case (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--gpu", type=int, default=0,
                        help="nvidia-smi index of the GPU (to run cases on several GPUs at once)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    args = parser.parse_args(argv)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="families-"))
    for index, case in enumerate(wanted):
        family = CASES[case][0]
        model = work / f"model-{family}"
        emit(run_case(case, work / case, model, args.frames, args.steps, args.smoke, args.gpu), args.out)
        if index + 1 == len(wanted) or CASES[wanted[index + 1]][0] != family:
            shutil.rmtree(model, ignore_errors=True)
    return 0


def run_case(case: str, folder: Path, model: Path, frames: int, steps: int, smoke: bool = False,
             gpu: int = 0) -> dict:
    family, model_overrides = CASES[case]
    size = (64, 64) if smoke else (WIDTH, HEIGHT)
    trained = size if smoke else (832 if family == "wan22_ti2v_5b" else 848, HEIGHT)  # the bucket (BUCKETS)
    record = {"bench": "families_step", "case": case, "family": family, "card": card_name(), "commit": git_commit(),
              "clip": f"{trained[0]}x{trained[1]}x{frames}", "steps": steps}
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        if not (model / "model_index.json").is_file():  # else built for the case before, same family
            builder = (f"build_tiny_family({str(model)!r}, {family!r})" if smoke else
                       f"build_real_shape_family({str(model)!r}, {family!r}, device='cuda')")
            _python(f"from engine.families.wan_random import build_real_shape_family, build_tiny_family; {builder}", gpu)
            record["build_s"] = round(time.monotonic() - started, 1)
        config = _write_config(folder, model, frames, steps, model_overrides, size, smoke)
        started = time.monotonic()
        home = folder / "home"
        devices = [] if smoke else ["--gpus", str(gpu)]
        result = subprocess.run([sys.executable, "-m", "studio", "--home", str(home), "train", str(config), *devices,
                                 "--follow", "--owner", "bench"], cwd=REPO_ROOT, env=_env(gpu),
                                capture_output=True, text=True, timeout=1800)
        record["job_s"] = round(time.monotonic() - started, 1)
        record.update(_read_run(home))
        record["ok"] = result.returncode == 0 and record.get("ended") == "done"
        if not record["ok"]:
            record["log_tail"] = (result.stdout + result.stderr)[-1500:]
    except Exception as exc:  # noqa: BLE001 - a failed case is recorded, the others still run
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
    return record


def _write_config(folder: Path, model: Path, frames: int, steps: int, model_overrides: dict,
                  size: tuple[int, int], smoke: bool) -> Path:
    import numpy as np
    import tomli_w

    from engine.media import write_video

    data = folder / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (frames, size[1], size[0], 3), dtype=np.uint8)
    write_video(clip, data / "clip.mp4", fps=16, crf=18)
    (data / "clip.txt").write_text("a random clip")
    doc = {"output_dir": str(folder / "out"), "max_steps": steps, "epochs": 1000, "save_every_n_steps": 10_000,
           "activation_checkpointing": True, "zero_stage": 0, "seed": 7, "cache_dir": str(folder / "cache"),
           "model": {"type": "wan", "ckpt_path": str(model), "dtype": "bfloat16", **model_overrides},
           # seed 7 with p_high 0.5 trains high, low, high, low in steps 1-4: three switches
           "adapter": {"type": "lora", "rank": 32, "dtype": "bfloat16"},
           "optimizer": {"type": "adamw", "lr": 2e-5},
           "dataset": {**({"resolutions": [size[0]], "enable_ar_bucket": False} if smoke else BUCKETS),
                       "frame_buckets": [frames], "directory": [{"path": str(data), "num_repeats": 1}]}}
    path = folder / "train.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def _read_run(home: Path) -> dict:
    """Step times, peak memory, experts and switch times of the (only) run under the studio home."""
    import json

    runs = sorted(path.parent for path in (home / "runs").rglob("metrics.jsonl"))  # runs/<user>/<run>/
    if not runs:
        return {"ended": None}
    run = runs[-1]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in events if e["event"] == "step"]
    elapsed = [0.0] + [e["elapsed_s"] for e in steps]
    seconds = [round(b - a, 3) for a, b in zip(elapsed, elapsed[1:])]
    log = (run / "train.log").read_text(errors="replace") if (run / "train.log").is_file() else ""
    switches = [(m.group(1), float(m.group(2))) for m in re.finditer(r"expert switch: (\w+) on the GPU in ([\d.]+) s", log)]
    ended = next((e["event"] for e in reversed(events) if e["event"] in ("done", "stopped", "error")), None)
    out = {"ended": ended, "step_s": seconds, "s_per_step": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
           "peak_gib": max((e.get("peak_mem_gib") or 0.0 for e in steps), default=None),
           "expert_switches": [{"to": name, "s": s} for name, s in switches]}
    if ended == "error":
        out["error"] = next(e["message"] for e in events if e["event"] == "error")[-1500:]
    return out


def _python(code: str, gpu: int) -> None:
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(gpu), check=True, timeout=1200)


def _env(gpu: int) -> dict[str, str]:
    # The job itself is placed by `--gpus` (the launcher sets its CUDA_VISIBLE_DEVICES); this picks the builder's.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": str(gpu),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


if __name__ == "__main__":
    sys.exit(main())
