"""Supervision of launched training jobs: progress from the trainer's events, stop escalation,
re-attaching after a restart, and the outcome of a run.

The outcome comes from the trainer's own record (its done / stopped / error event) together with
the exit code: DeepSpeed's runner exits 0 when a rank was killed by a signal, so an exit code of 0
without a final event is a failure, never a success.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.failures import classify_failure, oom_kill_count
from engine.jobs import ACTIVE_STATUSES, Job, JobStatus
from engine.launcher import is_same_process, reap_job, stop_process_group
from engine.metrics import MetricsReader
from engine.rundir import FINAL_EVENTS, RunDir, read_log_tail
from engine.store.jobs import JobStore

log = logging.getLogger(__name__)

REATTACH_TAIL_BYTES = 256 << 10


@dataclass
class Watched:
    """A process this scheduler supervises (launched by it, or re-attached after a restart)."""

    job_id: int
    pid: int
    reader: MetricsReader
    popen: subprocess.Popen | None = None  # when we launched it ourselves (exit code known)
    final_event: dict | None = None
    stop_thread: threading.Thread | None = None
    progress: tuple = ()
    oom_kills_at_start: int | None = None  # the memory cgroup's OOM-kill counter when watching began


class Supervisor:
    """The running jobs one scheduler watches; all state lives in the store, `watched` only
    remembers how far each job's events were read."""

    def __init__(self, store: JobStore, *, stop_grace_s: float, kill_grace_s: float,
                 on_exit: Callable[[], None]) -> None:
        self.store = store
        self.stop_grace_s = stop_grace_s
        self.kill_grace_s = kill_grace_s
        self.on_exit = on_exit  # a job ended: its devices are free for the queue
        self.watched: dict[int, Watched] = {}

    def get(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        assert job is not None, f"job {job_id} vanished from the store"
        return job

    # ---- after a restart -----------------------------------------------------------------------
    def recover(self) -> None:
        """Decide about every active job: requeue, re-attach, or record how it ended meanwhile."""
        for job in self.store.active():
            if job.pid is None and job.status == JobStatus.STOPPING:
                self.stopped_before_launch(job)
            elif job.pid is None:
                # Claimed but never spawned (crash in between): queue it again.
                self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.QUEUED, event="requeued after restart",
                                      gpus_assigned=[], master_port=None)
            elif is_same_process(job.pid, job.pid_start_time):
                log.info("re-attaching job %d (pid %d)", job.id, job.pid)
                self.store.add_event(job.id, "reattached", f"pid {job.pid}")
                self.watch(job, popen=None, reattach=True)
            else:
                self._finish_unwatched(job)

    def stopped_before_launch(self, job: Job) -> None:
        """A stop asked before any process started: nothing ran, nothing was saved."""
        self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.STOPPED, event="stopped before launch",
                              ended_at=time.time(), gpus_assigned=[], master_port=None,
                              failure_reason="Stopped before it started (no checkpoint was written)")

    def _finish_unwatched(self, job: Job) -> None:
        """The process ended while no scheduler watched: decide from the trainer's last event."""
        orphans = self._reap(job, own_group=False)
        final = self._final_event_of_this_launch(job)
        if final is None:
            tail = read_log_tail(job.log_path)
            self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.LOST, event="process gone",
                                  ended_at=time.time(), log_tail=tail,
                                  failure_reason="The process ended while the studio was not running",
                                  failure_hint="Resume the job to continue from its last checkpoint.")
            return
        self.record_outcome(job, exit_code=None, final=final, orphans=orphans)

    @staticmethod
    def _final_event_of_this_launch(job: Job) -> dict | None:
        """The trainer's last final event, unless it predates this launch (an earlier attempt's)."""
        final = RunDir(job.run_dir).final_event() if job.run_dir else None
        if final is not None and job.started_at and float(final.get("time") or 0) < job.started_at - 1:
            return None
        return final

    # ---- watching ------------------------------------------------------------------------------
    def watch(self, job: Job, popen: subprocess.Popen | None, reattach: bool) -> None:
        reader = MetricsReader(RunDir(job.run_dir or "").metrics)
        if reattach:
            reader.seek_tail(REATTACH_TAIL_BYTES)
        else:
            reader.skip_to_end()  # events of earlier launches in this run dir do not count
        self.watched[job.id] = Watched(job_id=job.id, pid=int(job.pid or 0), reader=reader, popen=popen,
                                       oom_kills_at_start=oom_kill_count())

    def forget_all(self) -> None:
        """Stop watching (leadership lost or given up); the next leader re-attaches from the store."""
        self.watched.clear()

    def supervise(self) -> None:
        jobs = {job.id: job for job in self.store.active()}
        for job_id, watched in list(self.watched.items()):
            job = jobs.get(job_id)
            if job is None:  # changed outside our watch (should not happen); forget it
                self.watched.pop(job_id, None)
                continue
            self._read_progress(job, watched)
            exited, exit_code = self._exit_status(watched)
            if exited:
                # Nothing of the job may outlive its outcome: ranks orphaned by a killed runner or
                # launcher would keep training beside a resume and free devices would be in use.
                orphans = self._reap(job, own_group=watched.popen is not None)
                self._read_progress(job, watched)
                self.watched.pop(job_id, None)
                self.record_outcome(self.get(job_id), exit_code=exit_code, final=watched.final_event,
                                    final_known=True, oom_killed=self._oom_killed(watched), orphans=orphans)
                self.on_exit()
            elif job.status == JobStatus.STOPPING:
                self._escalate_stop(job, watched)

    def _reap(self, job: Job, own_group: bool) -> int:
        """End what is left of the job; returns how many of its processes were still running."""
        reaped = reap_job(job.pid, job.run_dir, self.kill_grace_s, own_group=own_group)
        if reaped.found:
            self.store.add_event(job.id, "reaped", f"{reaped.found} process(es) outlived the launcher")
        if reaped.survivors:  # unkillable (uninterruptible I/O): say so rather than hide them
            log.error("job %d: processes %s survived SIGKILL", job.id, list(reaped.survivors))
            self.store.add_event(job.id, "survivors", f"pids {list(reaped.survivors)} survived SIGKILL")
        return reaped.found

    @staticmethod
    def _oom_killed(watched: Watched) -> bool | None:
        now = oom_kill_count()
        if now is None or watched.oom_kills_at_start is None:
            return None
        return now > watched.oom_kills_at_start

    def _exit_status(self, watched: Watched) -> tuple[bool, int | None]:
        if watched.popen is not None:
            code = watched.popen.poll()
            return code is not None, code
        return not is_same_process(watched.pid, self.get(watched.job_id).pid_start_time), None

    def _read_progress(self, job: Job, watched: Watched) -> None:
        values: dict = {}
        for event in watched.reader.read_new():
            kind = event.get("event")
            if kind == "start":
                watched.final_event = None
                values.update(total_steps=event.get("total_steps"), phase="starting")
            elif kind == "cache":
                values["phase"] = f"caching {event.get('done', '?')}/{event.get('total', '?')}"
            elif kind == "step":
                values.update(step=event.get("step"), total_steps=event.get("total_steps") or values.get(
                    "total_steps", job.total_steps), last_loss=event.get("loss"), eta_s=event.get("eta_s"),
                    phase="training")
            elif kind in FINAL_EVENTS:
                watched.final_event = event
                if event.get("step") is not None:
                    values["step"] = event["step"]
                values["phase"] = kind
        if values:
            progress = tuple(sorted(values.items()))
            if progress != watched.progress:
                watched.progress = progress
                self.store.update(job.id, **values)

    def _escalate_stop(self, job: Job, watched: Watched) -> None:
        if watched.stop_thread is not None:
            return
        requested = job.stop_requested_at or 0.0
        if time.time() - requested < self.stop_grace_s:
            return
        log.info("job %d did not stop after its stop file; signalling its process group", job.id)
        self.store.add_event(job.id, "sigterm", f"process group {watched.pid}")
        watched.stop_thread = threading.Thread(
            target=stop_process_group, args=(watched.pid, self.kill_grace_s), daemon=True,
            name=f"stop-job-{job.id}")
        watched.stop_thread.start()

    # ---- the outcome ---------------------------------------------------------------------------
    def record_outcome(self, job: Job, exit_code: int | None, final: dict | None,
                       final_known: bool = False, oom_killed: bool | None = None, orphans: int = 0) -> None:
        """`orphans`: processes still running when the launcher ended, which the studio then stopped.
        A `stopped` they wrote on that SIGTERM is not a stop the user asked for: the run failed."""
        if final is None and not final_known:
            final = self._final_event_of_this_launch(job)
        kind = final.get("event") if final else None
        stop_requested = job.status == JobStatus.STOPPING or job.stop_requested_at is not None
        values: dict = {"ended_at": time.time(), "exit_code": exit_code}
        if kind == "done" and exit_code in (0, None):
            status = JobStatus.SUCCEEDED
        elif kind == "stopped" and exit_code in (0, None) and (not orphans or stop_requested):
            status = JobStatus.STOPPED
        elif stop_requested and kind != "error":
            status = JobStatus.STOPPED
        else:
            status = JobStatus.FAILED
            tail = read_log_tail(job.log_path)
            message = final.get("message") if final and kind == "error" else None
            reason, hint = classify_failure(exit_code, tail, message, oom_killed=oom_killed, orphans=orphans)
            values.update(log_tail=tail, failure_reason=reason, failure_hint=hint)
        self.store.transition(job.id, ACTIVE_STATUSES, status,
                              event=f"exit {exit_code}" + (f", {kind}" if kind else ""), **values)
        log.info("job %d %s (exit %s)", job.id, status.value, exit_code)
