"""Helpers for the GPU acceptance suite (no tests here).

Every case drives the studio as a user does: `python -m studio ...` processes (CLI -> scheduler ->
launcher -> deepspeed) or the HTTP API of a running `app.py`. The job records are read from the
studio's SQLite database and the trainer's events from the run directory; nothing is mocked.
Results (one JSON line per case) and frames of generated videos go to test-artifacts/gpu/
(or $STUDIO_GPU_ARTIFACTS) for bench/RESULTS.md and for looking at.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from bench.gpu_common import git_commit
from engine.gpus import GpuInventory
from engine.jobs import Job
from engine.store.db import Database
from engine.store.jobs import JobStore
from tests.ui_support import wait_for  # noqa: F401 - one polling helper for all tests

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("STUDIO_GPU_ARTIFACTS", REPO_ROOT / "test-artifacts" / "gpu"))
JOB_TIMEOUT_S = 900
# The GPU (nvidia-smi index) of the one-GPU cases that name it: several such files can run at once on a
# machine with more GPUs, one per card (STUDIO_TEST_GPU=2 python3 -m pytest ...).
ONE_GPU = int(os.environ.get("STUDIO_TEST_GPU", "0"))


def gpus() -> list:
    """This machine's GPUs from nvidia-smi (the pytest process itself never touches CUDA)."""
    return GpuInventory(ttl_s=0).list()


def needs_gpus(count: int) -> pytest.MarkDecorator:
    found = len(gpus())
    return pytest.mark.skipif(
        found < count, reason=f"needs {count} CUDA GPU(s), nvidia-smi shows {found}: the GPU acceptance "
                              "suite runs on a GPU machine with `make test-gpu`")


def card() -> str:
    found = gpus()
    return f"{len(found)} x {found[0].name}" if found else "no GPU"


def record(case: str, **values: Any) -> None:
    """One JSON line per measured case, for bench/RESULTS.md (a copy without .git, as on a lent machine,
    names its commit in STUDIO_COMMIT)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    line = {"case": case, "card": card(), "commit": os.environ.get("STUDIO_COMMIT") or git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **values}
    with (ARTIFACTS / "results.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


# ---- the studio's CLI ------------------------------------------------------------------------------
def studio_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(extra or {})}


def studio(home: Path, *args: str, timeout: float = JOB_TIMEOUT_S,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m studio --home HOME ARGS...`, waited for."""
    return subprocess.run([sys.executable, "-m", "studio", "--home", str(home), *args], cwd=REPO_ROOT,
                          env=studio_env(env), capture_output=True, text=True, timeout=timeout)


def start_studio(home: Path, log_name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The same in the background; its output goes to HOME/LOG_NAME."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / log_name).open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "studio", "--home", str(home), *args], cwd=REPO_ROOT,
                                env=studio_env(env), stdout=out, stderr=subprocess.STDOUT, text=True)


def queued_job_id(output: str) -> int:
    match = re.search(r"job (\d+) queued", output)
    assert match, f"no 'job N queued' line in:\n{output[-3000:]}"
    return int(match.group(1))


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def job(home: Path, job_id: int) -> Job:
    found = JobStore(Database(home / "studio.db")).get(job_id)
    assert found is not None, f"no job {job_id} in {home}"
    return found


def explain(home: Path, job_id: int) -> str:
    record_ = job(home, job_id)
    log = Path(record_.log_path or "")
    tail = log.read_text(errors="replace")[-6000:] if log.is_file() else "(no log)"
    return f"job {job_id}: {record_.status.value} {record_.failure_reason or ''}\n{tail}"


# ---- run directories ------------------------------------------------------------------------------
def events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def of_kind(found: list[dict], kind: str) -> list[dict]:
    return [e for e in found if e.get("event") == kind]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in of_kind(events(run_dir), "step")}


def seconds_per_step(run_dir: str | Path, skip: int = 3) -> float:
    """Median wall time between consecutive steps, leaving out the first `skip` (warm-up, allocator)."""
    steps = of_kind(events(run_dir), "step")[skip:]
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
    assert len(gaps) >= 3, f"too few steps to time: {len(steps)}"
    return statistics.median(gaps)


# ---- configs --------------------------------------------------------------------------------------
def write_config(path: Path, base: dict, **changes: Any) -> Path:
    """`base` with `changes` merged in (tables merge key by key), written as TOML."""
    merged = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(merged), encoding="utf-8")
    return path


def demo_config(home: Path) -> dict:
    """The demo LoRA config the studio prepares (`python -m studio demo --prepare`), as a dict."""
    out = ok(studio(home, "demo", "--prepare", timeout=300))
    match = re.search(r"demo config:\s+(\S+)", out)
    assert match, out
    return tomllib.loads(Path(match.group(1)).read_text())


# ---- videos ---------------------------------------------------------------------------------------
def save_frames(video: Path, name: str, picks: tuple[float, ...] = (0.0, 0.5, 1.0)) -> list[Path]:
    """First, middle and last frame of a video as PNGs under the artifacts folder, to look at."""
    from engine.inference.export import write_poster
    from engine.media import read_video

    frames = read_video(video)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    written = []
    for pick in picks:
        index = round(pick * (len(frames) - 1))
        written.append(write_poster(frames[index], ARTIFACTS / f"{name}-frame{index}.png"))
    return written
