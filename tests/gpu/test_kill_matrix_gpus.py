"""kill -9 of the runner, DeepSpeed's launcher, one rank or every rank of a two-GPU studio job (the real
trainer under NCCL, driven through the CLI): the job fails, no process of it lives on and no GPU keeps
a process of it once the status is written; a resume then trains alone (one `done`). The CPU-rank
version is tests/test_kill_matrix.py."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.gpu.support import (
    demo_config,
    events,
    explain,
    job,
    needs_gpus,
    of_kind,
    ok,
    queued_job_id,
    record,
    start_studio,
    studio,
    wait_for,
    write_config,
)
from tests.scheduler_support import KILL_TARGETS, processes_naming, victims

pytestmark = needs_gpus(2)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-kills") / "home"


def gpu_processes() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return {int(line) for line in out.split() if line.strip().isdigit()}


@pytest.mark.parametrize("target", KILL_TARGETS)
def test_kill_9_on_two_gpus_fails_the_job_and_frees_the_gpus(home: Path, target: str) -> None:
    config = write_config(home / "configs" / f"kill-{target}.toml", demo_config(home),
                          max_steps=2000, epochs=1000, save_every_n_epochs=1000, checkpoint_every_n_epochs=1)
    follower = start_studio(home, f"kill-{target}.out", "train", str(config), "--num-gpus", "2",
                            "--name", f"kill-{target}", "--follow")
    job_id = wait_for(lambda: queued_job_id((home / f"kill-{target}.out").read_text())
                      if "queued" in (home / f"kill-{target}.out").read_text() else None, 120, "the job id")
    wait_for(lambda: len(of_kind(events(job(home, job_id).run_dir or "."), "step")) >= 3, 600, "3 steps")
    running = job(home, job_id)
    chosen = victims(running.pid, target)
    assert chosen, f"no {target} in the job's process group"
    rank_pids = {p.pid for p in victims(running.pid, "every rank")}
    assert rank_pids & gpu_processes(), "the ranks should hold the GPUs"
    for proc in chosen:
        proc.send_signal(signal.SIGKILL)
    follower.wait(timeout=300)  # the leading CLI records the outcome, then exits
    ended = job(home, job_id)
    left, on_gpu = processes_naming(ended.run_dir), rank_pids & gpu_processes()
    assert ended.status.value == "failed", explain(home, job_id)
    assert left == [] and on_gpu == set(), (left, on_gpu)
    assert not of_kind(events(ended.run_dir), "done")
    record(f"kill -9 {target} of a 2-GPU job", status=ended.status.value, reason=ended.failure_reason,
           processes_left=len(left))
    if target == "runner":  # the orphan case of old: the resume must train alone
        ok(studio(home, "jobs", "resume", str(job_id)))
        wait_for(lambda: len(of_kind(events(ended.run_dir), "start")) == 2, 300, "the resume to train")
        ok(studio(home, "jobs", "stop", str(job_id)))
        assert job(home, job_id).status.value == "stopped", explain(home, job_id)
        found = events(ended.run_dir)
        after = found[max(i for i, e in enumerate(found) if e.get("event") == "start"):]
        steps = [e["step"] for e in of_kind(after, "step")]
        assert steps == sorted(set(steps)), "a second writer in the run directory"
        assert len(of_kind(found, "start")) == 2 and not of_kind(found, "done")
