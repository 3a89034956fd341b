"""Helpers for the model-family tests (no tests here): train a tiny random model of a family with the real
trainer program, check the run, and generate with its LoRA through the real worker process. With
`via_studio` both go through the studio instead (`python -m studio train --follow`: a job under the
launcher; `python -m studio infer`: the service and its worker), which costs about 20 s more of start-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.trainer_support import (REPO_ROOT, make_dataset, of_kind, read_events, run_trainer, trainer_cmd,
                                   write_config)


@dataclass
class TrainedRun:
    run_dir: Path
    events: list[dict]
    save: Path  # the newest save folder


def studio(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio", "--home", str(home), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def train_family(tmp: Path, model: Path, *, images: int = 2, video: bool = False, via_studio: bool = False,
                 **overrides: object) -> TrainedRun:
    """A training run on a small dataset; asserts it ended `done`, with no warning, and with LoRAs whose
    B weights moved (they start at zero)."""
    from engine.lora import load_lora_state_dict

    data = make_dataset(tmp / "data", images=images, video=video, corrupt_video=False, uncaptioned=False)
    config = write_config(tmp, model, data, **{"epochs": 2, "dataset.frame_buckets": [1], **overrides})
    if via_studio:
        home = tmp / "home"
        result = studio(home, "train", str(config), "--follow", "--owner", "tester")
        runs = sorted((home / "runs").glob("*/*")) if (home / "runs").is_dir() else []
        assert result.returncode == 0 and runs, result.stdout[-2000:] + result.stderr[-3000:]
        run_dir = runs[-1]
    else:
        run_dir = tmp / "run"
        result = run_trainer(trainer_cmd(config, run_dir))
        assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run_dir)
    assert events and events[-1]["event"] == "done", events[-3:]
    assert not of_kind(events, "warning"), of_kind(events, "warning")
    save = Path(of_kind(events, "save")[-1]["path"])
    for file in save.glob("*.safetensors"):
        moved = [v.abs().max() > 0 for k, v in load_lora_state_dict(file).items() if k.endswith("lora_B.weight")]
        assert any(moved), f"{file.name} never trained"
    return TrainedRun(run_dir, events, save)


def start_image(path: Path, size: int = 32) -> Path:
    """A start image: a green square on grey."""
    from PIL import Image

    pixels = np.full((size, size, 3), 60, np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (40, 200, 40)
    Image.fromarray(pixels).save(path)
    return path


def generate_family(tmp: Path, model: Path, lora: Path | None, *, size: int = 32, frames: int = 1,
                    image: Path | None = None, via_studio: bool = False) -> dict:
    """One video with the LoRA (a file or save folder) and start image; asserts it succeeded and returns
    the worker's `video` event (via_studio: the final status of `studio infer --json`)."""
    if via_studio:
        args = ["infer", "--model", str(model), "--prompt", "a green square", "--width", str(size), "--height",
                str(size), "--frames", str(frames), "--steps", "2", "--guidance", "1", "--seed", "1", "--owner",
                "tester", "--json"]
        args += ["--lora", str(lora)] if lora else []
        args += ["--image", str(image)] if image else []
        result = studio(tmp / "home", *args)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        status = json.loads(result.stdout.strip().splitlines()[-1])
        assert status["state"] == "succeeded" and status["gallery_ids"], status
        return status
    from engine.inference.request import resolve_lora_path

    request = {"prompt": "a green square", "negative_prompt": "", "guidance_scale": 1.0, "steps": 2, "num_videos": 1,
               "seed": 1, "width": size, "height": size, "num_frames": frames, "fps": 8, "flow_shift": 3.0,
               "loras": [{"weight": 1.0}] if lora else [], "image": str(image) if image else None}
    commands = [json.dumps({"op": "generate", "id": "r1", "request": request, "model_path": str(model),
                            "lora_files": [str(resolve_lora_path(lora))] if lora else [],
                            "out_dir": str(tmp / "gen")}),
                json.dumps({"op": "shutdown"})]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine.inference.worker", "--device", "cpu"], cwd=REPO_ROOT,
                          env=env, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=240)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    mine = [e for e in events if e.get("id") == "r1"]
    assert mine and mine[-1]["event"] == "done", proc.stderr[-3000:]
    video = next(e for e in mine if e["event"] == "video")
    assert any(Path(video["dir"]).iterdir())
    return video
