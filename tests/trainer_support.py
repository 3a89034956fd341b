"""Helpers for the trainer tests (no tests here): a small dataset, a training TOML, running
`python -m engine.trainer` and reading the events it writes. Used by test_trainer*.py and test_multinode.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_dataset(folder: Path, *, images: int = 4, video: bool = True, corrupt_video: bool = True,
                 uncaptioned: bool = True) -> Path:
    """Small coloured squares with captions, plus a video, a corrupt video and an uncaptioned image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        size = (48, 32) if i % 2 else (32, 32)
        pixels = np.full((size[1], size[0], 3), 20, np.uint8)
        colour = (200, 40, 200) if i % 2 else (40, 200, 40)
        pixels[8:24, 8:24] = colour
        pixels += rng.integers(0, 10, pixels.shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"square{i}.png")
        (folder / f"square{i}.txt").write_text("a purple square" if i % 2 else "a green square")
    if uncaptioned:
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(folder / "nocaption.png")
    if video:
        write_video(folder / "clip.mp4", frames=9)
        (folder / "clip.txt").write_text("a moving square")
    if corrupt_video:
        (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
        (folder / "broken.txt").write_text("never used")
    return folder


def write_video(path: Path, frames: int, size: int = 32) -> None:
    from engine.media import write_video as encode

    clip = np.full((frames, size, size, 3), 30, np.uint8)
    for i in range(frames):
        clip[i, 4:14, (2 * i) % 20:(2 * i) % 20 + 10] = (220, 200, 30)
    encode(clip, path, fps=8, crf=23)


def write_config(tmp: Path, model: Path, data: Path, **overrides: object) -> Path:
    """A training TOML with an inline dataset; `overrides` are top-level or 'table.key' values."""
    tables: dict[str, dict[str, object]] = {
        "": {"output_dir": str(tmp / "out"), "epochs": 4, "cache_dir": str(tmp / "cache"), "seed": 7},
        "model": {"type": "wan", "ckpt_path": str(model), "timestep_sample_method": "uniform"},
        "adapter": {"type": "lora", "rank": 8},
        "optimizer": {"type": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        "dataset": {"resolutions": [32], "frame_buckets": [1, 5]},
    }
    for key, value in overrides.items():
        table, _, name = key.rpartition(".")
        tables.setdefault(table, {})[name] = value
    import tomli_w

    doc: dict = dict(tables[""])
    for table, values in tables.items():
        if table:
            doc[table] = values
    doc["dataset"]["directory"] = [{"path": str(data), "num_repeats": 1}]
    path = tmp / "train.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def trainer_cmd(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.trainer", "--config", str(config), "--run-dir", str(run_dir), *extra]


def run_trainer(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=trainer_env())


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("STUDIO_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def of_kind(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["event"] == "step" and e["step"] >= step for e in read_events(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def save_lora_file(run: Path, label: str, step: int | None, epoch: int | None = None) -> Path:
    """A minimal LoRA save (one tensor) with the step/epoch metadata the trainer writes."""
    import torch
    from safetensors.torch import save_file

    (run / label).mkdir(parents=True)
    meta = {"format": "pt"}
    if step is not None:
        meta["step"] = str(step)
    if epoch is not None:
        meta["epoch"] = str(epoch)
    file = run / label / "adapter_model.safetensors"
    save_file({"x": torch.zeros(1)}, str(file), metadata=meta)
    return file
