"""Helpers for the scheduler tests (no tests here): the stand-in trainer, a minimal config, waits."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from engine.jobs import Job, JobStatus
from engine.launcher import group_members
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


# ---- a job's process tree (the kill matrix, CPU and GPU) -------------------------------------------
KILL_TARGETS = ("runner", "launcher", "one rank", "every rank")


def processes_naming(run_dir: str) -> list[str]:
    """Every live process on this machine whose command line names the run directory."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if run_dir in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.pid}: {cmdline[:160]}")
    return found


def victims(runner_pid: int, target: str) -> list[psutil.Process]:
    """The processes of a DeepSpeed job's group that `target` names (one of KILL_TARGETS)."""
    tree = group_members(runner_pid)
    ranks = sorted((p for p in tree if "--local_rank" in " ".join(p.cmdline())), key=lambda p: " ".join(p.cmdline()))
    chosen = {"runner": [p for p in tree if p.pid == runner_pid],
              "launcher": [p for p in tree if "deepspeed.launcher.launch" in " ".join(p.cmdline())],
              "one rank": ranks[-1:],  # the last rank: rank 0 keeps training until the launcher reacts
              "every rank": ranks}[target]
    assert chosen, f"no {target} in {[' '.join(p.cmdline())[:80] for p in tree]}"
    return chosen
