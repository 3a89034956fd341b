"""Helpers for the scheduler tests (no tests here): the stand-in trainer, a minimal config, waits."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.jobs import Job, JobStatus
from engine.scheduler import Scheduler
from tests import ui_support

STANDIN = Path(__file__).with_name("standin_trainer.py")
STANDIN_MODULE = "tests.standin_trainer"
WAIT_S = 60.0


def config_toml(tmp: Path) -> str:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    return (f'output_dir = "{tmp / "out"}"\n[model]\nckpt_path = "demo"\n'
            f'[dataset]\n[[dataset.directory]]\npath = "{data}"\n')


def wait_for(predicate: Callable[[], object], timeout: float = WAIT_S, what: str = "condition") -> object:
    return ui_support.wait_for(predicate, timeout, what, interval=0.05)  # scheduler ticks are 0.1 s


def wait_status(sched: Scheduler, job_id: int, *statuses: JobStatus, timeout: float = WAIT_S) -> Job:
    wait_for(lambda: sched.get(job_id).status in statuses, timeout,
             f"job {job_id} to be {[s.value for s in statuses]} (is {sched.get(job_id).status.value})")
    return sched.get(job_id)
