"""kill -9 anywhere in a job's process tree (runner, DeepSpeed's launcher, one rank, every rank; 1 and 2
CPU ranks under the real `deepspeed` launcher, stand-in trainer module): the job fails, never succeeds;
no process of it is alive when its status is written; a resume runs alone and writes one `done`.

The default suite runs the one-rank cases; the two-rank ones (each job costs two launcher start-ups on
2 cores, the cases at once about 50 s) run with `make test-heavy`: the GPU suite kills the same four
targets of two-rank jobs of the real trainer (tests/gpu/test_kill_matrix_gpus.py), and a rank killed
under two CPU ranks fails its job in tests/test_engine_deepspeed.py."""
from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.gpus import GpuInventory
from engine.jobs import Job, JobStatus
from engine.launcher import build_deepspeed_command, group_members
from engine.paths import DataLayout
from engine.scheduler import Scheduler
from engine.store.db import Database
from tests.scheduler_support import STANDIN_MODULE, config_toml, processes_naming, victims, wait_for

# (ranks, which processes get SIGKILL); with one rank, "one rank" and "every rank" are the same.
CASES = [(1, "runner"), (1, "launcher"), (1, "every rank"),
         (2, "runner"), (2, "launcher"), (2, "one rank"), (2, "every rank")]
MATRICES = [pytest.param([case for case in CASES if case[0] == 1], id="one-rank"),
            pytest.param([case for case in CASES if case[0] == 2], id="two-ranks", marks=pytest.mark.heavy)]
TIMEOUT_S = 240


@pytest.fixture
def scheduler(studio_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scheduler]:
    monkeypatch.setenv("STANDIN_STEPS", "80")
    monkeypatch.setenv("STANDIN_STEP_S", "0.1")
    layout = DataLayout(studio_home).ensure()
    slots = sum(ranks for ranks, _ in CASES)
    sched = Scheduler(Database(layout.db_path), layout, GpuInventory(command="/nonexistent"), cpu_slots=slots,
                      poll_interval_s=0.2, stop_grace_s=30, kill_grace_s=5,
                      command_builder=functools.partial(build_deepspeed_command, module=STANDIN_MODULE))
    yield sched.start()
    sched.shutdown()
    for job in sched.list_jobs(limit=100):
        if job.pid:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def events(job: Job) -> list[dict]:
    return [json.loads(line) for line in (Path(job.run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("cases", MATRICES)
def test_kill_9_anywhere_fails_the_job_and_leaves_no_process(scheduler: Scheduler, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             cases: list[tuple[int, str]]) -> None:
    jobs = {case: scheduler.submit_training(config_toml(tmp_path), "alice", num_gpus=case[0], name=f"k{i}")
            for i, case in enumerate(cases)}
    alive = dict(jobs)

    def kill_those_training() -> bool:  # each job as soon as it trains with all its ranks
        for (ranks, target), job in list(alive.items()):
            running = scheduler.get(job.id)
            if (running.step or 0) >= 2 and len(group_members(running.pid)) >= 2 + ranks:
                for proc in victims(running.pid, target):
                    proc.send_signal(signal.SIGKILL)
                del alive[(ranks, target)]
        return not alive

    wait_for(kill_those_training, TIMEOUT_S, "every job to train")

    for (ranks, target), job in jobs.items():
        wait_for(lambda j=job: not scheduler.get(j.id).status.is_active, TIMEOUT_S, f"job {job.id} to end")
        ended = scheduler.get(job.id)
        # Read right after the status: the tree is reaped before the outcome is written.
        left = processes_naming(ended.run_dir)
        assert ended.status == JobStatus.FAILED, (ranks, target, ended.status, ended.failure_reason)
        assert left == [], (ranks, target, left)
        reasons = ("signal 9", "without saying it finished", "launcher ended while")
        assert any(r in ended.failure_reason for r in reasons), (ranks, target, ended.failure_reason)
        assert not any(e["event"] == "done" for e in events(ended)), (ranks, target)
    # The resumes only have to run to their end: 10 steps, not the 80 that left the kill loop time to
    # catch every job training (a job killed past step 10 resumes straight to `done`).
    monkeypatch.setenv("STANDIN_STEPS", "10")
    for job in jobs.values():
        scheduler.resume(job.id)

    for (ranks, target), job in jobs.items():
        wait_for(lambda j=job: not scheduler.get(j.id).status.is_active, TIMEOUT_S, f"job {job.id} to resume")
        finished = scheduler.get(job.id)
        assert finished.status == JobStatus.SUCCEEDED, (ranks, target, finished.failure_reason, finished.log_tail)
        kinds = [e["event"] for e in events(finished)]
        assert kinds.count("done") == 1 and kinds.count("start") == 2, (ranks, target, kinds)
        assert processes_naming(finished.run_dir) == []
