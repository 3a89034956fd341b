"""One device model and a queue that explains itself (issue 16): pure placement rules, the control
rules per job state, and with real processes: an idle inference worker gives its CPU slot to a
queued training job at once and comes back warm when the training ends, and with two CPU slots the
worker runs on the CPU."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from engine.gallery import Gallery
from engine.gpus import Device, cpu_pool, on_cpu, process_placement
from engine.inference.request import InferRequest
from engine.inference.service import InferenceService
from engine.jobs import Job, JobStatus
from engine.launcher import LaunchSpec, worker_env
from engine.paths import DataLayout
from engine.placement import explain_queue, reserved_for_head
from engine.scheduler import Scheduler
from engine.store.db import Database
from engine.store.jobs import JobStore
from studio.api import allowed_actions, control_refusal
from tests.scheduler_support import STANDIN, config_toml, wait_for


def job(job_id: int, status: JobStatus = JobStatus.QUEUED, requested: str = "1", assigned=(), owner="alice",
        explicit: bool = False) -> Job:
    return Job(id=job_id, kind="train", name=f"run{job_id}", owner=owner, status=status, gpus_requested=requested,
               gpus_explicit=explicit, gpus_assigned=list(assigned))


def test_one_device_type_for_cpu_slots_and_gpus() -> None:
    assert cpu_pool(2) == [-1, -2] and [Device(d).label for d in cpu_pool(2)] == ["CPU slot 1", "CPU slot 2"]
    assert Device.gpu(3).label == "GPU 3" and not Device.gpu(0).is_cpu
    # cpu_slots >= 2: slot 2 is still the CPU (it once became `--device cuda CUDA_VISIBLE_DEVICES=-2`)
    assert process_placement([-2]) == ("cpu", "") and process_placement([1]) == ("cuda", "1")
    env, device = worker_env([-2], base={"CUDA_VISIBLE_DEVICES": "0"})
    assert device == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert on_cpu([-2]) and not on_cpu([0, 1])
    spec = LaunchSpec(job_id=1, job_name="x", run_dir=Path("/r"), devices=(-1, -2), master_port=1)
    assert spec.on_cpu


def test_queue_explains_who_holds_what_and_the_order() -> None:
    pool = cpu_pool(1)
    running = job(1, JobStatus.RUNNING, assigned=[-1], owner="alice")
    waits = explain_queue([job(2, owner="bob"), job(3, owner="bob")], pool, [running], holds=[])
    first, second = waits
    assert first.position == 1 and "CPU slot 1 is used by job #1 run1 (alice, running)" in first.describe()
    assert "job #1 (another user's, running)" in first.describe(lambda owner: owner == "bob")
    assert second.position == 2 and "waits behind job #2" in second.describe()
    held = explain_queue([job(4)], pool, [], holds=[(-1, "infer-abc-0", 4242)])[0]
    assert "CPU slot 1 is held by an inference worker (pid 4242; it gives way when idle)" in held.describe()
    # the slot goes to the earlier queued job at the next tick: the later one says so, never "starting"
    after_head = explain_queue([job(7), job(8, owner="bob")], pool, [], holds=[])[1]
    assert after_head.describe() == "#2 of 2 in the queue, needs 1 CPU slot: CPU slot 1 is kept for job #7 run7 (alice, queued)"
    gpus = explain_queue([job(5, requested="1", explicit=True)], [0, 1], [job(6, JobStatus.RUNNING, assigned=[1])], [])
    assert gpus[0].needs == "GPU 1" and "GPU 1 is used by job #6" in gpus[0].describe()


def test_a_worker_yields_only_the_device_the_head_of_the_queue_needs() -> None:
    assert reserved_for_head([job(1)], [0, 1], [], held=[0]) == {1}  # a free GPU is taken first
    assert reserved_for_head([job(1, requested="2")], [0, 1], [], held=[0]) == {0, 1}
    blocked_by_a_job = [job(2, JobStatus.RUNNING, assigned=[0, 1])]
    assert reserved_for_head([job(1)], [0, 1], blocked_by_a_job, held=[]) == set()
    assert reserved_for_head([], [0], [], held=[0]) == set()


def test_the_api_tells_each_user_why_their_job_waits(api, tmp_path: Path) -> None:
    from engine.demo.world import sample_specs, write_dataset
    from studio.auth import User
    from tests.ui_support import train_toml

    shared = api.ctx.layout.home / "datasets" / "shared"
    write_dataset(shared, sample_specs(2, seed=5))
    alice, bob = User("alice"), User("bob")
    first = api.start_training(alice, train_toml("demo", shared), "", 1, "first")
    second = api.start_training(bob, train_toml("demo", shared), "", 1, "second")
    [seen_by_bob] = api.list_jobs(bob)
    assert seen_by_bob["id"] == second["id"] and seen_by_bob["queue_position"] == 2
    assert seen_by_bob["waiting_for"].endswith(f"CPU slot 1 is kept for job #{first['id']} (another user's, queued)")
    head = api.job_status(alice, first["id"])
    assert head["queue_position"] == 1 and head["waiting_for"] == "#1 of 2 in the queue, needs 1 CPU slot: starting"


@pytest.mark.parametrize("status, action, expected", [
    (JobStatus.SUCCEEDED, "stop", "job 7 already succeeded"),
    (JobStatus.FAILED, "save", "job 7 already failed; resume it to go on"),
    (JobStatus.RUNNING, "cancel", "job 7 is running; use stop"),
    (JobStatus.RUNNING, "resume", "job 7 is running; stop it first"),
    (JobStatus.QUEUED, "save", "job 7 is queued; only a running job can save"),
    (JobStatus.SUCCEEDED, "resume", "job 7 already succeeded"),
])
def test_controls_are_refused_by_name_outside_their_states(status, action, expected) -> None:
    assert control_refusal(job(7, status), action) == expected
    assert action not in allowed_actions(job(7, status))


def test_controls_allowed_where_they_make_sense() -> None:
    assert allowed_actions(job(1, JobStatus.QUEUED)) == ["stop", "cancel"]
    assert allowed_actions(job(1, JobStatus.RUNNING)) == ["stop", "save"]
    assert allowed_actions(job(1, JobStatus.STOPPED)) == ["resume"]
    assert allowed_actions(job(1, JobStatus.SUCCEEDED)) == []


# ---- real processes: a scheduler, a stand-in trainer, the inference worker on the demo model -----
def standin(spec: LaunchSpec) -> list[str]:
    return [sys.executable, str(STANDIN), "--config", str(spec.config_path), "--run-dir", str(spec.run_dir),
            "--steps", "4000", "--step-s", "0.05"]  # outlives the test; stopped at its end


def small_request(**changes) -> InferRequest:
    values = dict(model="demo", prompt="a red circle moving right", width=32, height=32, num_frames=5, steps=2,
                  guidance_scale=4.0, flow_shift=3.0, seed=3, fps=8)
    return InferRequest(**{**values, **changes})


@pytest.mark.slow  # a stand-in trainer and three generations on the demo model: about 45 s on 2 busy cores
def test_cpu_slot_two_runs_inference_on_cpu_and_an_idle_worker_yields_to_training_then_comes_back_warm(tmp_path: Path) -> None:
    from engine.gpus import GpuInventory

    layout = DataLayout(tmp_path / "home").ensure()
    db = Database(layout.db_path)
    scheduler = Scheduler(JobStore(db), layout, GpuInventory(command="/nonexistent"), cpu_slots=2,
                          poll_interval_s=0.2, stop_grace_s=1.0, kill_grace_s=2.0, command_builder=standin).start()
    service = InferenceService(db, layout, scheduler, Gallery(db, layout), idle_timeout_s=600)
    try:
        first = scheduler.submit_training(config_toml(tmp_path), "carol", name="first")  # takes CPU slot 1
        wait_for(lambda: scheduler.get(first.id).status == JobStatus.RUNNING, 30, "the first job to run")
        request_id = service.submit(small_request(), "alice")
        status = service.wait(request_id, 240)
        assert status["state"] == "succeeded", status["error"]
        assert status["worker"].endswith("on cpu")  # CPU slot 2 is the CPU, never "cuda"
        assert [h.device for h in scheduler.store.holds()] == [-2]  # the warm worker keeps slot 2 (idle 600 s)

        queued = scheduler.submit_training(config_toml(tmp_path), "bob", name="after-generation")
        started = time.monotonic()
        wait_for(lambda: scheduler.get(queued.id).status == JobStatus.RUNNING, 20, "training to start")
        assert time.monotonic() - started < 10, "the idle worker did not give way at once"
        assert scheduler.get(queued.id).gpus_assigned == [-2]
        # a generation now waits and says why
        waiting = service.submit(small_request(seed=4), "alice")
        wait_for(lambda: service.status(waiting)["state"] == "waiting" and service.status(waiting)["waiting_for"],
                 30, "the generation to wait")
        reason = service.status(waiting)["waiting_for"]
        assert "CPU slot 2 is used by job #" in reason and "another user's" in reason, reason
        service.cancel(waiting)

        # the training ends: the worker comes back on its own and loads the model before anyone asks
        scheduler.stop(queued.id, force=True)
        warm = wait_for(lambda: [w for w in service.workers() if w["warm"]], 120, "the worker to come back warm")
        assert warm[0]["device"] == "cpu" and warm[0]["serving"] is None
        again = service.wait(service.submit(small_request(seed=5), "alice"), 240)
        assert again["state"] == "succeeded", again["error"]
        assert again["timings"]["load_s"] == 0.0, again["timings"]  # the worker's own timing: no model load
        scheduler.stop(first.id, force=True)
    finally:
        service.shutdown()
        scheduler.shutdown()
        for job_row in JobStore(db).list(limit=10):
            if job_row.pid and job_row.status.is_active:
                import os
                import signal
                try:
                    os.killpg(job_row.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        db.close()
