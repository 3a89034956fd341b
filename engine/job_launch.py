"""Launching one claimed training job: its run directory made ready, the DeepSpeed command spawned
through the launcher, the process recorded and handed to the supervisor."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from engine.jobs import ACTIVE_STATUSES, Job, JobStatus
from engine.launcher import LaunchSpec, Nodes, build_env, process_identity, spawn_process
from engine.paths import REPO_ROOT, DataLayout
from engine.rundir import RunDir, run_dir_name
from engine.store.jobs import JobStore
from engine.supervision import Supervisor

log = logging.getLogger(__name__)


def launch_job(job: Job, store: JobStore, supervisor: Supervisor, layout: DataLayout, nodes: Nodes | None,
               command_builder) -> bool:  # noqa: ANN001 - CommandBuilder (engine.scheduler)
    """Start `job` (claimed: devices and port assigned). False when it did not start: stopped
    meanwhile, or the launch itself failed (the job is then failed with the reason)."""
    run_dir = Path(job.run_dir or layout.runs_dir / run_dir_name(job.id, job.name, job.owner))
    files = RunDir(run_dir)
    launched_at = time.time()  # control requests made from now on are for this launch
    current = store.get(job.id)
    if current is not None and current.status == JobStatus.STOPPING:  # stopped between the claim and here
        supervisor.stopped_before_launch(job)
        return False
    try:
        files.write_config(job.config_toml)
        files.discard_stale_control_files(launched_at)  # an earlier attempt's stop would end this one
        resume = job.resume and files.latest_complete_checkpoint() is not None
        spec = LaunchSpec(job_id=job.id, job_name=job.name, run_dir=run_dir, devices=tuple(job.gpus_assigned),
                          master_port=int(job.master_port or 0), resume=resume, nodes=nodes,
                          studio_home=layout.home, control_since=launched_at)
        argv = command_builder(spec)
        with open(spec.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"=== studio: launch {job.attempts + 1} of job {job.id} at "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
        popen = spawn_process(argv, cwd=REPO_ROOT, env=build_env(spec, None), log_path=spec.log_path)
    except Exception as exc:  # noqa: BLE001 - any launch error fails this job, not the scheduler
        log.exception("could not launch job %d", job.id)
        store.transition(job.id, ACTIVE_STATUSES, JobStatus.FAILED, event="launch failed", ended_at=time.time(),
                         failure_reason=f"Could not start: {exc}",
                         failure_hint="Check the studio log and the job's run directory.")
        return False
    identity = process_identity(popen.pid)
    store.update(job.id, pid=popen.pid, pid_start_time=identity.start_time if identity else None,
                 started_at=time.time(), run_dir=str(run_dir), log_path=str(spec.log_path),
                 attempts=job.attempts + 1, step=None, eta_s=None, phase="starting")
    store.transition(job.id, [JobStatus.STARTING], JobStatus.RUNNING, event=f"pid {popen.pid}")
    supervisor.watch(store.get(job.id), popen=popen, reattach=False)
    return True
