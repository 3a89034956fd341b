"""The scheduler driving the real `deepspeed` launcher on CPU ranks (stand-in trainer module)."""
from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import psutil
import pytest

from engine.gpus import GpuInventory
from engine.jobs import JobStatus
from engine.launcher import build_deepspeed_command, group_members
from engine.paths import DataLayout
from engine.scheduler import Scheduler
from engine.store.db import Database
from tests.scheduler_support import STANDIN_MODULE, config_toml, wait_for, wait_status



@pytest.fixture
def scheduler(studio_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "2000")
    monkeypatch.setenv("STANDIN_STEP_S", "0.05")
    layout = DataLayout(studio_home).ensure()
    sched = Scheduler(Database(layout.db_path), layout, GpuInventory(command="/nonexistent"), cpu_slots=2,
                      poll_interval_s=0.2, stop_grace_s=30, kill_grace_s=5,
                      command_builder=functools.partial(build_deepspeed_command, module=STANDIN_MODULE))
    yield sched.start()
    sched.shutdown()
    for job in sched.list_jobs(limit=100):
        if job.pid and job.status.is_active:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_two_cpu_ranks_stop_and_kill_9(scheduler: Scheduler, tmp_path: Path) -> None:
    job = scheduler.submit_training(config_toml(tmp_path), "alice", num_gpus=2)
    wait_for(lambda: (scheduler.get(job.id).step or 0) >= 2, 120, "the first steps under deepspeed")
    running = scheduler.get(job.id)
    assert running.gpus_assigned == [-1, -2]
    log_text = Path(running.log_path).read_text()
    assert f"world=2 port={running.master_port} unbuffered=1" in log_text
    # runner + launcher + two ranks, all in the job's process group
    wait_for(lambda: len(group_members(running.pid)) >= 4, 60, "both ranks")
    ranks = [p for p in group_members(running.pid) if "--local_rank" in " ".join(p.cmdline())]
    assert len(ranks) == 2

    scheduler.stop(job.id)  # the stop file: rank 0 reports `stopped`, every rank exits 0
    stopped = wait_status(scheduler, job.id, JobStatus.STOPPED, timeout=120)
    assert stopped.exit_code == 0 and stopped.failure_reason is None
    assert not group_members(running.pid)

    resumed = scheduler.resume(job.id)
    assert resumed.status == JobStatus.QUEUED
    wait_for(lambda: (scheduler.get(job.id).step or 0) > stopped.step, 120, "steps after resume")
    rank0 = wait_for(lambda: [p for p in group_members(scheduler.get(job.id).pid)
                              if "--local_rank=0" in " ".join(p.cmdline())], 60, "rank 0")
    rank0[0].send_signal(signal.SIGKILL)  # DeepSpeed's launcher then kills the other rank
    failed = wait_status(scheduler, job.id, JobStatus.FAILED, timeout=120)
    assert failed.failure_reason == "Killed by signal 9 (SIGKILL)"
    assert "exits with return code = -9" in failed.log_tail
    assert "resume=True" in failed.log_tail
    wait_for(lambda: not group_members(failed.pid), 30, "no process of the group")
    assert not psutil.pid_exists(rank0[0].pid) or rank0[0].status() == psutil.STATUS_ZOMBIE
