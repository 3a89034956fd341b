"""`python -m studio infer` in a real subprocess, then `python -m studio gallery ...` on its results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.families.wan_random import build_random_wan
from engine.inference.random_lora import random_lora
from engine.media import probe_video
from studio.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_infer_then_gallery_commands(tmp_path: Path, studio_home: Path, capsys: pytest.CaptureFixture) -> None:
    model = build_random_wan(tmp_path / "tiny", preset="tiny")
    lora = random_lora(model, tmp_path / "style", seed=4)
    out_dir = tmp_path / "out"
    argv = [sys.executable, "-m", "studio", "--home", str(studio_home), "infer", "--model", str(model),
            "--lora", f"{lora}:0.8", "--prompt", "a purple star", "--width", "48", "--height", "32",
            "--frames", "5", "--steps", "2", "--seed", "3", "--fps", "8", "--out", str(out_dir), "--owner", "carol",
            "--json"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status["state"] == "succeeded" and status["seed"] == 3
    (item_id,) = status["gallery_ids"]
    assert (out_dir / f"{item_id}.mp4").is_file() and (out_dir / f"{item_id}.json").is_file()
    assert probe_video(out_dir / f"{item_id}.mp4").frames == 5

    home = ["--home", str(studio_home)]
    code, out, _ = cli(capsys, *home, "gallery", "list", "--lora", "style", "--json")
    listed = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and listed["total"] == 1 and listed["items"][0]["loras"][0]["weight"] == 0.8
    code, out, _ = cli(capsys, *home, "gallery", "show", item_id)
    assert code == 0 and "seed 3, 2 steps" in out and "style:0.8" in out and "carol" in out
    assert cli(capsys, *home, "gallery", "favorite", item_id)[0] == 0
    code, out, _ = cli(capsys, *home, "gallery", "list", "--favorites")
    assert code == 0 and item_id in out
    code, out, _ = cli(capsys, *home, "gallery", "export", item_id)
    assert code == 0 and Path(out.strip()).is_file()
    assert cli(capsys, *home, "gallery", "delete", item_id)[0] == 0
    code, _, err = cli(capsys, *home, "gallery", "show", item_id)
    assert code == 1 and "not found" in err


def test_infer_rejects_bad_values_before_any_model_work(studio_home: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "--home", str(studio_home), "infer", "--model", "demo", "--prompt", "x",
                       "--frames", "10", "--width", "100")
    assert code == 2 and "num_frames" in err and "width" in err
    code, _, err = cli(capsys, "--home", str(studio_home), "infer", "--model", str(studio_home / "none"),
                       "--prompt", "x", "--width", "64", "--height", "64", "--frames", "5")
    assert code == 2 and "model" in err


@pytest.mark.slow
def test_a_tiny_demo_request_on_cpu_does_not_warn(studio_home: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(capsys, "--home", str(studio_home), "infer", "--model", "demo", "--prompt", "a star",
                         "--width", "32", "--height", "32", "--frames", "5", "--steps", "2", "--owner", "carol")
    assert code == 0 and "seed" in out, err[-2000:]
    assert "warning:" not in err  # the long-request warning is for long requests only
