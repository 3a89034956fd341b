"""The real trainer under the real `deepspeed` launcher, driven through the CLI on a tiny random Wan.

train (the CLI launches and exits; the trainer runs on) -> jobs stop (a new process re-attaches and
stops it) -> jobs resume --follow (continues from the checkpoint to the end) -> list/show/logs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.paths import REPO_ROOT

MAX_STEPS = 300  # steps take about 13 ms: the stop must land before the end on a fast machine too


@pytest.fixture(scope="module")
def training_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.families.wan_random import build_random_wan

    root = tmp_path_factory.mktemp("e2e")
    build_random_wan(root / "model")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a red square number {i}")
    config = root / "train.toml"
    config.write_text(f'''output_dir = "{root / 'out'}"
max_steps = {MAX_STEPS}
epochs = 1000
save_every_n_steps = 1000
[model]
ckpt_path = "{root / 'model'}"
dtype = "float32"
transformer_dtype = "float32"
[dataset]
resolutions = [32]
frame_buckets = [1]
[[dataset.directory]]
path = "data"
''')
    return config


def studio(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio", "--home", str(home), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_cli_train_stop_resume_with_the_real_trainer(studio_home: Path, training_config: Path) -> None:
    started = studio(studio_home, "train", str(training_config), "--owner", "alice")
    assert started.returncode == 0, started.stderr
    assert "job 1 queued" in started.stdout and "job 1: running" in started.stdout
    run_dir = studio_home / "runs" / "alice" / "1-out"
    assert (run_dir / "run.toml").is_file()

    deadline = time.monotonic() + 180
    while not any(e["event"] == "step" and e["step"] >= 3 for e in metrics(run_dir)):
        assert time.monotonic() < deadline, (run_dir / "train.log").read_text()[-3000:]
        assert not any(e["event"] in ("done", "error") for e in metrics(run_dir)), "ended too early"
        time.sleep(0.2)

    stopped = studio(studio_home, "jobs", "stop", "1")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip().endswith("job 1: stopped"), stopped.stdout
    stop_step = [e for e in metrics(run_dir) if e["event"] == "stopped"][-1]["step"]
    assert stop_step < MAX_STEPS

    resumed = studio(studio_home, "jobs", "resume", "1", "--follow")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"succeeded |####################| {MAX_STEPS}/{MAX_STEPS}" in resumed.stdout
    events = metrics(run_dir)
    restart = [e for e in events if e["event"] == "start"][-1]
    assert restart.get("resumed_from_step") == stop_step  # continued, not restarted
    assert events[-1]["event"] == "done"
    final_save = [e for e in events if e["event"] == "save"][-1]
    assert final_save["step"] == MAX_STEPS and list(Path(final_save["path"]).glob("*.safetensors"))
    # The end of a followed run says where its LoRAs are; so does `jobs show`.
    saved_file = str(next(Path(final_save["path"]).glob("*.safetensors")))
    assert "LoRAs (" in resumed.stdout and saved_file in resumed.stdout, resumed.stdout

    listing = studio(studio_home, "jobs", "list")
    assert "succeeded" in listing.stdout and f"{MAX_STEPS}/{MAX_STEPS}" in listing.stdout
    shown = studio(studio_home, "jobs", "show", "1")
    assert saved_file in shown.stdout.split("history:")[0]
    history = [line.split()[2:] for line in shown.stdout.split("history:")[1].strip().splitlines()]
    kinds = [entry[0] for entry in history]
    assert kinds == ["created", "starting", "running", "reattached", "stopping", "stopped", "queued",
                     "starting", "running", "succeeded"], shown.stdout
    assert history[6][1] == "resume"
    logs = studio(studio_home, "jobs", "logs", "1", "-n", "200")
    assert "--resume" in logs.stdout and "=== studio: launch 2 of job 1" in logs.stdout
    bad = studio(studio_home, "jobs", "cancel", "1")
    assert bad.returncode == 2 and "only a queued job can be cancelled" in bad.stderr


@pytest.mark.slow
def test_a_stop_asked_before_the_trainer_started_is_obeyed(training_config: Path, tmp_path: Path) -> None:
    """The studio passes its launch time; a stop written after it but before the trainer's own start
    (the first seconds of a job) stops the run at once, with nothing saved."""
    from engine.rundir import RunDir

    run_dir = tmp_path / "run"
    launched_at = time.time()
    RunDir(run_dir).request_stop()
    time.sleep(1.5)  # the launcher's start-up: the trainer process begins after the request
    done = subprocess.run([sys.executable, "-m", "engine.trainer", "--config", str(training_config),
                           "--run-dir", str(run_dir), "--control-since", repr(launched_at)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = [e["event"] for e in metrics(run_dir)]
    assert kinds[-1] == "stopped" and "step" not in kinds, kinds
    assert [e for e in metrics(run_dir) if e["event"] == "stopped"][0]["step"] == 0
    assert not list(run_dir.glob("global_step*")) and not list(run_dir.glob("epoch*"))
    assert not (run_dir / "stop").exists()  # consumed: a resume would not stop again
