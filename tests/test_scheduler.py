"""Scheduler with real processes (a stand-in trainer script), real SQLite, real signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from engine.failures import oom_kill_count
from engine.gpus import GpuInventory
from engine.jobs import JobError, JobStatus
from engine.launcher import LaunchSpec, Nodes, group_members
from engine.paths import DataLayout
from engine.scheduler import Scheduler
from engine.store.db import Database
from engine.store.jobs import JobStore
from tests.scheduler_support import STANDIN, config_toml, wait_for, wait_status

class StandIn:
    """Command builder: the stand-in script; behaviour per job name ("ok", "slow", ...)."""

    BEHAVIOURS = {
        "ok": ["--steps", "5", "--step-s", "0.05"],
        "slow": ["--steps", "400", "--step-s", "0.05"],
        "oom": ["--steps", "5", "--mode", "oom"],
        "ignore-stop": ["--steps", "400", "--step-s", "0.05", "--mode", "ignore-stop"],
        "child": ["--steps", "400", "--step-s", "0.05", "--mode", "child"],
        "resumable": ["--steps", "40", "--step-s", "0.05"],
    }

    def __init__(self) -> None:
        self.specs: list[LaunchSpec] = []

    def __call__(self, spec: LaunchSpec) -> list[str]:
        self.specs.append(spec)
        if spec.job_name == "silent-exit":  # DeepSpeed's runner after a rank died of a signal
            return [sys.executable, "-c", "print('runner: exit 0, no final event')"]
        argv = [sys.executable, str(STANDIN), "--config", str(spec.config_path), "--run-dir", str(spec.run_dir)]
        if spec.resume:
            argv.append("--resume")
        return argv + self.BEHAVIOURS[spec.job_name]


@pytest.fixture
def make_scheduler(studio_home: Path) -> Iterator[Callable[..., Scheduler]]:
    layout = DataLayout(studio_home).ensure()
    made: list[Scheduler] = []
    builder = StandIn()

    def make(cpu_slots: int = 1, **kwargs) -> Scheduler:
        kwargs.setdefault("poll_interval_s", 0.1)
        kwargs.setdefault("stop_grace_s", 1.0)
        kwargs.setdefault("kill_grace_s", 2.0)
        sched = Scheduler(JobStore(Database(layout.db_path)), layout, GpuInventory(command="/nonexistent"),
                          cpu_slots=cpu_slots, command_builder=builder, **kwargs)
        made.append(sched)
        return sched

    make.builder = builder  # type: ignore[attr-defined]
    yield make
    for sched in made:
        sched.shutdown()
    # Leave nothing running behind a failed test.
    for job in JobStore(Database(layout.db_path)).list(limit=1000):
        if job.pid and job.status.is_active:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_three_jobs_on_two_slots_third_waits_then_runs(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler(cpu_slots=2).start()
    cfg = config_toml(tmp_path)
    a = sched.submit_training(cfg, "alice", name="slow")
    b = sched.submit_training(cfg, "alice", name="slow")
    c = sched.submit_training(cfg, "bob", name="ok")
    wait_status(sched, a.id, JobStatus.RUNNING)
    wait_status(sched, b.id, JobStatus.RUNNING)
    assert sched.get(c.id).status == JobStatus.QUEUED
    ja, jb = sched.get(a.id), sched.get(b.id)
    assert sorted(ja.gpus_assigned + jb.gpus_assigned) == [-2, -1]  # never two jobs on one slot
    assert ja.master_port != jb.master_port  # two concurrent jobs, two ports
    runs = sched.layout.runs_dir  # each user's runs under their own folder
    assert Path(ja.run_dir) == runs / "alice" / f"{a.id}-slow"
    assert Path(sched.get(c.id).run_dir) == runs / "bob" / f"{c.id}-ok"
    sched.stop(a.id)
    assert wait_status(sched, a.id, JobStatus.STOPPED).exit_code == 0
    done = wait_status(sched, c.id, JobStatus.SUCCEEDED)
    assert done.step == 5 and done.total_steps == 5 and done.last_loss == pytest.approx(0.2)
    assert Path(done.run_dir, "run.toml").read_text() == cfg
    assert "home=" + str(sched.layout.home) in Path(done.log_path).read_text()
    sched.stop(b.id, force=True)
    wait_status(sched, b.id, JobStatus.STOPPED)


def test_multi_node_jobs_take_the_agreed_port_and_a_chosen_run_dir(make_scheduler, tmp_path: Path) -> None:
    nodes = Nodes(hostfile=tmp_path / "hostfile", node_rank=1, master_addr="10.0.0.1", master_port=29413)
    sched = make_scheduler(cpu_slots=2, nodes=nodes).start()
    cfg = config_toml(tmp_path)
    shared = tmp_path / "shared"
    with pytest.raises(JobError, match="--run-dir"):  # each node's runs/<id>-<name> is its own
        sched.submit_training(cfg, "alice", name="slow")
    a = sched.submit_training(cfg, "alice", name="slow", run_dir=shared)
    assert (a.run_dir, a.log_path) == (str(shared), str(shared / "train.node1.log"))
    assert f'cache_dir = "{shared / "cache"}"' in a.config_toml  # not split over the nodes' homes
    with pytest.raises(JobError, match=f"run dir {shared} is in use by job {a.id}"):
        sched.submit_training(cfg, "bob", name="ok", run_dir=shared)
    b = sched.submit_training(cfg, "bob", name="ok", run_dir=tmp_path / "other")
    assert wait_status(sched, a.id, JobStatus.RUNNING).master_port == 29413  # fixed, not picked
    assert make_scheduler.builder.specs[-1].nodes == nodes
    time.sleep(0.5)
    assert sched.get(b.id).status == JobStatus.QUEUED  # a CPU slot is free, the agreed port is not
    sched.stop(a.id, force=True)
    wait_status(sched, a.id, JobStatus.STOPPED)
    assert wait_status(sched, b.id, JobStatus.SUCCEEDED).master_port == 29413
    c = sched.submit_training(cfg, "bob", name="slow", run_dir=shared)  # free again once a ended
    with pytest.raises(JobError, match=f"in use by job {c.id}"):
        sched.resume(a.id)
    sched.stop(c.id, force=True)
    wait_status(sched, c.id, JobStatus.STOPPED)


def test_progress_is_recorded_while_running(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler().start()
    job = sched.submit_training(config_toml(tmp_path), "alice", name="slow")
    wait_for(lambda: (sched.get(job.id).step or 0) >= 3, what="progress")
    running = sched.get(job.id)
    assert running.total_steps == 400 and running.last_loss is not None and running.eta_s > 0
    assert "/400" in running.progress_text
    sched.request_save(job.id)
    wait_for(lambda: '"save"' in Path(running.run_dir, "metrics.jsonl").read_text(), what="save event")
    sched.stop(job.id, force=True)
    wait_status(sched, job.id, JobStatus.STOPPED)


def test_stop_escalates_to_sigkill_and_leaves_no_process_of_the_group(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler().start()
    cfg = config_toml(tmp_path)
    stubborn = sched.submit_training(cfg, "alice", name="ignore-stop")
    running = wait_status(sched, stubborn.id, JobStatus.RUNNING)
    wait_for(lambda: (sched.get(stubborn.id).step or 0) >= 1, what="first step")
    sched.stop(stubborn.id)
    assert sched.get(stubborn.id).status == JobStatus.STOPPING
    stopped = wait_status(sched, stubborn.id, JobStatus.STOPPED)
    assert stopped.exit_code == -signal.SIGKILL  # ignored both the stop file and SIGTERM
    assert not group_members(running.pid)
    kinds = [e.kind for e in sched.events(stubborn.id)]
    assert kinds[-3:] == ["stopping", "sigterm", "stopped"]

    with_child = sched.submit_training(cfg, "alice", name="child")
    running = wait_status(sched, with_child.id, JobStatus.RUNNING)
    wait_for(lambda: len(group_members(running.pid)) >= 2, what="the grandchild")
    sched.stop(with_child.id, force=True)
    wait_status(sched, with_child.id, JobStatus.STOPPED)
    wait_for(lambda: not group_members(running.pid), 20, "every process of the group to end")


def test_kill_9_gives_failed_with_log_tail(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler().start()
    job = sched.submit_training(config_toml(tmp_path), "alice", name="slow")
    wait_for(lambda: (sched.get(job.id).step or 0) >= 2, what="steps")
    os.kill(sched.get(job.id).pid, signal.SIGKILL)
    failed = wait_status(sched, job.id, JobStatus.FAILED)
    assert failed.exit_code == -9
    assert failed.failure_reason == "Killed by signal 9 (SIGKILL)"
    if oom_kill_count() is not None:  # the memory cgroup is readable here: a person's kill is not an OOM kill
        assert failed.failure_hint.startswith("Not the out-of-memory killer")
    else:
        assert "out-of-memory killer" in failed.failure_hint and "kill -9" in failed.failure_hint
    assert "standin pid" in failed.log_tail
    assert sched.resume(job.id).status == JobStatus.QUEUED  # failed jobs resume


def test_resume_refuses_while_a_process_of_the_previous_attempt_lives(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler().start()
    job = sched.submit_training(config_toml(tmp_path), "alice", name="ok")
    done = wait_status(sched, job.id, JobStatus.SUCCEEDED)
    # A leftover the studio could not end (it would have been reaped): its group is the job's pid.
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", done.run_dir],
                                start_new_session=True)
    try:
        sched.store.update(job.id, pid=leftover.pid, status=JobStatus.FAILED)
        with pytest.raises(JobError, match=f"1 process.*still run.*{leftover.pid}"):
            sched.resume(job.id)
    finally:
        leftover.kill()
        leftover.wait()
    assert sched.resume(job.id).status == JobStatus.QUEUED


def test_exit_0_without_a_final_event_is_a_failure_not_a_success(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler().start()
    job = sched.submit_training(config_toml(tmp_path), "alice", name="silent-exit")
    failed = wait_status(sched, job.id, JobStatus.FAILED)
    assert failed.exit_code == 0 and "without saying it finished" in failed.failure_reason
    assert "resume" in failed.failure_hint
    assert sched.resume(job.id).status == JobStatus.QUEUED


def test_trainer_error_is_classified(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler().start()
    job = sched.submit_training(config_toml(tmp_path), "alice", name="oom")
    failed = wait_status(sched, job.id, JobStatus.FAILED)
    assert failed.exit_code == 1
    assert failed.failure_reason == "CUDA out of memory"
    assert "activation_checkpointing" in failed.failure_hint
    assert "Tried to allocate" in failed.log_tail


def test_restart_reattaches_running_job_and_records_success(make_scheduler, tmp_path: Path) -> None:
    first = make_scheduler().start()
    job = first.submit_training(config_toml(tmp_path), "alice", name="resumable")
    running = wait_status(first, job.id, JobStatus.RUNNING)
    wait_for(lambda: (first.get(job.id).step or 0) >= 2, what="steps")
    first.shutdown()  # the app goes away; the trainer keeps running
    assert psutil.pid_exists(running.pid)
    second = make_scheduler().start()
    assert second.is_leader
    assert "reattached" in [e.kind for e in second.events(job.id)]
    done = wait_status(second, job.id, JobStatus.SUCCEEDED)
    assert done.step == 40 and done.pid == running.pid


def test_missing_pid_becomes_lost_and_resumes(make_scheduler, tmp_path: Path) -> None:
    first = make_scheduler().start()
    job = first.submit_training(config_toml(tmp_path), "alice", name="resumable")
    running = wait_status(first, job.id, JobStatus.RUNNING)
    wait_for(lambda: (first.get(job.id).step or 0) >= 3, what="steps")
    first.shutdown()
    os.killpg(running.pid, signal.SIGKILL)  # the trainer dies while no studio watches
    wait_for(lambda: not group_members(running.pid), 20, "the trainer to die")
    second = make_scheduler().start()
    lost = wait_status(second, job.id, JobStatus.LOST)
    assert lost.failure_hint.startswith("Resume")
    resumed = second.resume(job.id)
    assert resumed.status == JobStatus.QUEUED and resumed.resume
    done = wait_status(second, job.id, JobStatus.SUCCEEDED)
    assert done.attempts == 2 and done.run_dir == running.run_dir
    assert make_scheduler.builder.specs[-1].resume  # launched with --resume
    text = Path(done.log_path).read_text()
    assert "resume=True" in text and "first=1 " in text  # first launch from step 1, resume later


def test_queue_order_priority_cancel_and_bad_requests(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler()  # not started: nothing launches, order is inspectable
    cfg = config_toml(tmp_path)
    a = sched.submit_training(cfg, "u", name="ok")
    b = sched.submit_training(cfg, "u", name="ok")
    c = sched.submit_training(cfg, "u", name="ok", priority=5)
    assert [j.id for j in sched.queue()] == [c.id, a.id, b.id]
    sched.move_to_front(b.id)
    assert [j.id for j in sched.queue()] == [b.id, c.id, a.id]
    assert sched.cancel(a.id).status == JobStatus.STOPPED
    with pytest.raises(JobError, match="only a queued job"):
        sched.cancel(a.id)
    with pytest.raises(JobError, match="no GPUs"):
        sched.submit_training(cfg, "u", gpus=[0])
    with pytest.raises(JobError, match="only 1 CPU slot"):
        sched.submit_training(cfg, "u", num_gpus=2)
    with pytest.raises(JobError, match="no job 999"):
        sched.get(999)
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="optimizer.lr"):
        sched.submit_training(cfg + "[optimizer]\nlr = -1.0\n", "u")
    assert [j.id for j in sched.list_jobs(owner="u", statuses=["queued"])] == [c.id, b.id]


def test_devices_for_inference_share_the_bookkeeping(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler(cpu_slots=2).start()
    assert sched.acquire_devices("infer-worker") == [-1]
    assert sched.acquire_devices("infer-worker") == [-1]  # same holder: same device
    job = sched.submit_training(config_toml(tmp_path), "u", name="slow")
    running = wait_status(sched, job.id, JobStatus.RUNNING)
    assert running.gpus_assigned == [-2]
    assert sched.acquire_devices("other") is None  # everything is taken
    sched.release_devices("infer-worker")
    assert sched.acquire_devices("other") == [-1]
    sched.stop(job.id, force=True)
    wait_status(sched, job.id, JobStatus.STOPPED)


def test_second_scheduler_only_enqueues_while_the_first_leads(make_scheduler, tmp_path: Path) -> None:
    leader = make_scheduler().start()
    follower = make_scheduler().start()
    assert leader.is_leader and not follower.is_leader
    job = follower.submit_training(config_toml(tmp_path), "cli", name="slow")
    running = wait_status(follower, job.id, JobStatus.RUNNING)  # the leader launched it
    assert job.id in leader.supervisor.watched and not follower.supervisor.watched
    follower.stop(running.id, force=True)  # a stop from the follower reaches the leader
    wait_status(follower, job.id, JobStatus.STOPPED)
    leader.shutdown()
    wait_for(lambda: follower.is_leader, 10, "the follower to take over")


def test_holds_of_a_dead_process_are_released(make_scheduler, tmp_path: Path) -> None:
    sched = make_scheduler(cpu_slots=1)
    assert sched.store.hold_devices("crashed-app-worker", [-1], pid=os.getpid(), pid_start_time=1.0)
    leader = make_scheduler(cpu_slots=1).start()
    assert leader.is_leader and not sched.is_leader
    # Not only the leader: whichever process next asks for a device sees the holder is not the
    # process that took the slot (same pid, other start time) and frees it.
    assert sched.acquire_devices("new-worker") == [-1]
    assert [h.holder for h in sched.store.holds()] == ["new-worker"]


@pytest.mark.parametrize("event_age_s, expected", [(0, JobStatus.STOPPED), (100, JobStatus.LOST)])
def test_outcome_after_restart_uses_only_this_launchs_final_event(make_scheduler, tmp_path: Path,
                                                                  event_age_s: float, expected) -> None:
    """A trainer that ended while no studio ran: its own `stopped` event counts, an older one does not."""
    sched = make_scheduler()
    job = sched.submit_training(config_toml(tmp_path), "u", name="ok")
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True)
    started = time.time() - 10
    (run_dir / "metrics.jsonl").write_text(
        f'{{"event": "stopped", "time": {started + 5 - event_age_s}, "step": 3}}\n')
    sched.store.transition(job.id, [JobStatus.QUEUED], JobStatus.RUNNING, pid=2**22 + 7, pid_start_time=started,
                           started_at=started)  # a pid that no longer exists
    sched.start()
    assert sched.get(job.id).status == expected
