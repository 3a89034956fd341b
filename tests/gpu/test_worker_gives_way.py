"""Issue 16 on a GPU: an idle inference worker gives its GPU to a training job queued for that GPU
within seconds, and once the training ends it comes back by itself with the model loaded (the next
generation reports load_s 0). The CPU-slot version is tests/test_queue_devices.py."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.gallery import Gallery
from engine.gpus import GpuInventory
from engine.inference.request import InferRequest
from engine.inference.service import InferenceService
from engine.jobs import JobStatus
from engine.launcher import LaunchSpec
from engine.paths import DataLayout
from engine.scheduler import Scheduler
from engine.store.db import Database
from engine.store.jobs import JobStore
from tests.gpu.support import needs_gpus
from tests.scheduler_support import STANDIN, config_toml, wait_for

pytestmark = needs_gpus(1)


def standin(spec: LaunchSpec) -> list[str]:
    return [sys.executable, str(STANDIN), "--config", str(spec.config_path), "--run-dir", str(spec.run_dir),
            "--steps", "400", "--step-s", "0.05"]


def request(seed: int) -> InferRequest:
    return InferRequest(model="demo", prompt="a red circle moving right", width=64, height=64, num_frames=9,
                        steps=4, guidance_scale=4.0, flow_shift=3.0, seed=seed, fps=8)


def test_idle_gpu_worker_gives_way_to_training_and_comes_back_warm(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "home").ensure()
    db = Database(layout.db_path)
    scheduler = Scheduler(JobStore(db), layout, GpuInventory(), poll_interval_s=0.2, stop_grace_s=1.0,
                          kill_grace_s=2.0, command_builder=standin).start()
    service = InferenceService(db, layout, scheduler, Gallery(db, layout), idle_timeout_s=600, max_workers=1)
    try:
        first = service.wait(service.submit(request(1), "alice"), 300)
        assert first["state"] == "succeeded" and first["worker"].endswith("on cuda"), first
        [worker] = service.workers()
        queued = scheduler.submit_training(config_toml(tmp_path), "bob", gpus=worker["devices"], name="needs-it")
        asked = time.monotonic()
        wait_for(lambda: scheduler.get(queued.id).status == JobStatus.RUNNING, 30, "training to start")
        gave_way_s = time.monotonic() - asked
        assert gave_way_s < 10, f"the idle worker took {gave_way_s:.1f} s to give way"
        assert service.workers() == []
        scheduler.stop(queued.id, force=True)
        asked = time.monotonic()
        warm = wait_for(lambda: [w for w in service.workers() if w["warm"]], 120, "the worker to come back warm")
        print(f"gave way in {gave_way_s:.1f} s; warm again {time.monotonic() - asked:.1f} s after the stop")
        assert warm[0]["device"] == "cuda" and warm[0]["devices"] == worker["devices"]
        again = service.wait(service.submit(request(2), "alice"), 300)
        assert again["state"] == "succeeded", again["error"]
        assert again["timings"]["load_s"] == 0.0, again["timings"]
    finally:
        service.shutdown()
        scheduler.shutdown()
        db.close()
