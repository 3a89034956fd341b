"""The job queue: placement on devices, launching, and leadership (supervision of what runs is
engine.supervision; failure reasons engine.failures; the run's files engine.rundir).

Several schedulers may share one database (the app and a CLI). Only the one holding the
`scheduler.lock` file lock in the data directory launches and supervises; the others enqueue,
stop and read, and keep trying to take over, so a CLI `--follow` survives the app exiting.

Every decision is taken from the database (not from memory), so a restarted app picks up
exactly where the previous one left off; trainers live in their own sessions and keep running.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import filelock

from engine.gpus import GpuInventory, cpu_pool, on_cpu
from engine.jobs import RESUMABLE_STATUSES, Job, JobError, JobStatus, parse_job_id
from engine.job_launch import launch_job
from engine.launcher import (LaunchSpec, Nodes, build_deepspeed_command, is_same_process, job_processes,
                             pick_master_port, process_identity, train_log_path)
from engine.paths import DataLayout
from engine.placement import Blocker, QueueWait, choose_devices, explain_queue, occupants, reserved_for_head
from engine.rundir import RunDir, run_dir_name
from engine.store.db import Database
from engine.store.jobs import JobEvent, JobStore
from engine.supervision import Supervisor

log = logging.getLogger(__name__)

CommandBuilder = Callable[[LaunchSpec], list[str]]


# ---- the scheduler ------------------------------------------------------------------------------
class Scheduler:
    """Queue + device allocation + supervision of training jobs; device holds for inference."""

    def __init__(self, store: JobStore | Database, layout: DataLayout, gpu_inventory: GpuInventory,
                 cpu_slots: int = 1, *, poll_interval_s: float = 1.0, stop_grace_s: float = 30.0,
                 kill_grace_s: float = 15.0, nodes: Nodes | None = None,
                 command_builder: CommandBuilder | None = None) -> None:
        if cpu_slots < 1:
            raise ValueError(f"cpu_slots must be >= 1, got {cpu_slots}")
        self.store = store if isinstance(store, JobStore) else JobStore(store)
        self.layout = layout
        self.gpus = gpu_inventory
        self.cpu_slots = cpu_slots
        self.poll_interval_s = poll_interval_s
        self.stop_grace_s = stop_grace_s
        self.kill_grace_s = kill_grace_s
        self.nodes = nodes  # None: jobs run on this machine only
        self.command_builder = command_builder or build_deepspeed_command
        self._lock_file = filelock.FileLock(str(layout.home / "scheduler.lock"), thread_local=False)
        self._leader = False
        self.supervisor = Supervisor(self.store, stop_grace_s=stop_grace_s, kill_grace_s=kill_grace_s,
                                     on_exit=self.wake)
        self._known_gpus: list[int] = []
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._tick_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Start the supervision thread (recovery runs first when we become the leader)."""
        if self._thread is None:
            self.layout.runs_dir.mkdir(parents=True, exist_ok=True)
            self._closing.clear()
            self._tick()
            self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
            self._thread.start()
        return self

    @property
    def is_leader(self) -> bool:
        return self._leader

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop supervising. Trainers keep running; the next scheduler re-attaches them."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._tick_lock:
            self.supervisor.forget_all()
            if self._leader:
                self._lock_file.release()
                self._leader = False

    def refresh(self) -> None:
        """One recovery + supervision pass without launching anything (for read-only CLI calls):
        records the outcome of trainers that ended while no scheduler ran."""
        with self._tick_lock:
            if self._leader or not self._try_lead():
                return
            try:
                self._supervise()
            finally:
                self.supervisor.forget_all()
                self._lock_file.release()
                self._leader = False

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            if self._closing.is_set():
                break
            self._tick()

    def _tick(self) -> None:
        with self._tick_lock:
            try:
                if not self._leader:
                    self._try_lead()
                if self._leader:
                    self._supervise()
                    self._start_queued()
            except Exception:  # the loop must survive anything (a full disk, a locked db)
                log.exception("scheduler tick failed")

    def _try_lead(self) -> bool:
        try:
            self._lock_file.acquire(timeout=0)
        except filelock.Timeout:
            return False
        self._leader = True
        log.info("scheduler %d leads the queue in %s", os.getpid(), self.layout.home)
        try:
            self._recover()
        except BaseException:
            # Half a recovery would leave running jobs unwatched: give the lead up, retry next tick.
            self.supervisor.forget_all()
            self._lock_file.release()
            self._leader = False
            raise
        return True

    # ---- public operations ---------------------------------------------------------------------
    def submit_training(self, config_toml: str, owner: str, *, gpus: list[int] | None = None,
                        num_gpus: int | None = None, name: str | None = None, priority: int = 0,
                        run_dir: str | os.PathLike | None = None) -> Job:
        """`run_dir` replaces runs/<id>-<name>, e.g. one shared directory that the studios of all
        nodes of a multi-node run point at."""
        from engine.config import TrainConfig  # heavy import chain; only needed here

        config = TrainConfig.from_toml_string(config_toml).validate()
        requested, explicit = self._check_request(gpus, num_gpus)
        chosen = Path(run_dir).expanduser().resolve() if run_dir is not None else None
        if chosen is not None:
            self._check_run_dir_free(chosen)
        if self.nodes is not None and self.nodes.no_ssh:
            if chosen is None:  # runs/<id>-<name> differs per node: ranks would write to different dirs
                raise JobError("this studio is one node of a multi-node run (node_rank is set): give a run "
                               "dir on a shared filesystem, the same on every node (--run-dir)")
            if not config.cache_dir:
                # Each rank encodes its share of the latent cache and then reads all of it: the default
                # (this node's STUDIO_HOME) would split the cache over the nodes' local disks.
                config.cache_dir = str(chosen / "cache")
                config_toml = config.to_toml()
        job_name = name or Path(config.output_dir).name or "train"
        job = self.store.insert(kind="train", name=job_name, owner=owner, status=JobStatus.QUEUED,
                                config_toml=config_toml, gpus_requested=requested,
                                gpus_explicit=explicit, priority=int(priority))
        chosen = chosen or self.layout.runs_dir / run_dir_name(job.id, job_name, owner)
        self.store.update(job.id, run_dir=str(chosen), log_path=str(train_log_path(chosen, self.nodes)))
        self.wake()
        return self.get(job.id)

    def _check_run_dir_free(self, run_dir: Path, job_id: int | None = None) -> None:
        """Two trainers in one run directory would overwrite each other's checkpoints."""
        for other in [*self.store.queued(), *self.store.active()]:
            if other.id != job_id and other.run_dir and Path(other.run_dir).resolve() == run_dir.resolve():
                raise JobError(f"run dir {run_dir} is in use by job {other.id} ({other.status.value}); "
                               "stop it first or choose another --run-dir")

    def _check_request(self, gpus: list[int] | None, num_gpus: int | None) -> tuple[str, bool]:
        if gpus is not None and num_gpus is not None:
            raise JobError("give either gpus (indices) or num_gpus (a count), not both")
        pool = self._device_pool()
        cpu_only = on_cpu(pool)
        if gpus is not None:
            if not gpus:
                raise JobError("gpus: the list of GPU indices is empty")
            if len(set(gpus)) != len(gpus):
                raise JobError(f"gpus: {gpus} names a GPU twice")
            if cpu_only:
                raise JobError("gpus: this machine has no GPUs; use num_gpus for CPU ranks")
            missing = sorted(set(gpus) - set(pool))
            if missing:
                raise JobError(f"gpus: no GPU {missing} on this machine (have {sorted(pool)})")
            return ",".join(str(g) for g in sorted(gpus)), True
        count = 1 if num_gpus is None else int(num_gpus)
        if count < 1:
            raise JobError(f"num_gpus must be >= 1, got {count}")
        if count > len(pool):
            what = f"{len(pool)} CPU slot(s) (setting cpu_slots)" if cpu_only else f"{len(pool)} GPU(s)"
            raise JobError(f"num_gpus={count} but this machine has only {what}")
        return str(count), False

    def get(self, job_id: int) -> Job:
        job = self.store.get(parse_job_id(job_id))
        if job is None:
            raise JobError(f"no job {job_id}")
        return job

    def list_jobs(self, owner: str | None = None, statuses: Iterable[JobStatus | str] | None = None,
                  limit: int = 50, offset: int = 0) -> list[Job]:
        return self.store.list(owner=owner, statuses=statuses, limit=limit, offset=offset)

    def events(self, job_id: int) -> list[JobEvent]:
        """The job's state history, oldest first."""
        return self.store.events(parse_job_id(job_id))

    def stop(self, job_id: int, force: bool = False) -> Job:
        """Queued: cancel. Running: drop the `stop` file; SIGTERM after the grace period, then
        SIGKILL. `force` (or a second stop) skips the grace period."""
        job = self.get(job_id)
        if job.status == JobStatus.QUEUED:
            return self.cancel(job_id)
        if job.status == JobStatus.STOPPING:
            force = True
        if job.status.is_active:
            if job.run_dir:
                RunDir(job.run_dir).request_stop()
            requested_at = 0.0 if force else time.time()
            self.store.transition(job.id, [JobStatus.STARTING, JobStatus.RUNNING, JobStatus.STOPPING],
                                  JobStatus.STOPPING, event="force" if force else "stop file written",
                                  stop_requested_at=requested_at)
            self.wake()
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        if not self.store.transition(parse_job_id(job_id), [JobStatus.QUEUED], JobStatus.STOPPED, event="cancelled",
                                     ended_at=time.time(), failure_reason="Cancelled before it started"):
            job = self.get(job_id)
            raise JobError(f"job {job_id} is {job.status.value}, only a queued job can be cancelled"
                           + ("; use stop" if job.status.is_active else ""))
        self.wake()
        return self.get(job_id)

    def resume(self, job_id: int) -> Job:
        """Queue a stopped/failed/lost training job again in its run dir (--resume when a
        checkpoint exists)."""
        job = self.get(job_id)
        if job.kind != "train":
            raise JobError(f"job {job_id} is a {job.kind} job; only training jobs resume")
        if job.status not in RESUMABLE_STATUSES:
            raise JobError(f"job {job_id} is {job.status.value}; only stopped, failed or lost jobs resume")
        if job.run_dir:
            self._check_run_dir_free(Path(job.run_dir), job.id)
        left = job_processes(job.pid, job.run_dir)
        if left:  # a second trainer beside them would write the same checkpoints
            pids = ", ".join(str(p.pid) for p in left)
            raise JobError(f"job {job_id}: {len(left)} process(es) of its previous attempt still run "
                           f"(pids {pids}); wait for them to end or kill them, then resume")
        ok = self.store.transition(
            job.id, RESUMABLE_STATUSES, JobStatus.QUEUED, event="resume",
            resume=True, exit_code=None, failure_reason=None, failure_hint=None, log_tail=None,
            ended_at=None, stop_requested_at=None, pid=None, pid_start_time=None, master_port=None,
            gpus_assigned=[], queue_pos=time.time(),
        )
        if not ok:
            raise JobError(f"job {job_id} changed state meanwhile; try again")
        self.wake()
        return self.get(job_id)

    def request_save(self, job_id: int) -> None:
        job = self.get(job_id)
        if job.status not in (JobStatus.STARTING, JobStatus.RUNNING) or not job.run_dir:
            raise JobError(f"job {job_id} is {job.status.value}; only a running job can save")
        RunDir(job.run_dir).request_save()

    def move_to_front(self, job_id: int) -> Job:
        """Manual reordering: the queued job goes first (highest queued priority, first place)."""
        job = self.get(job_id)
        if job.status != JobStatus.QUEUED:
            raise JobError(f"job {job_id} is {job.status.value}; only queued jobs can be reordered")
        priority, position = self.store.queue_front_position()
        self.store.update(job.id, priority=max(priority, job.priority), queue_pos=position)
        self.wake()
        return self.get(job_id)

    def queue(self) -> list[Job]:
        """Queued jobs in the order they will start."""
        self._release_stale_holds()  # whoever reads the queue frees what a dead process held
        return self.store.queued()

    def queue_waits(self) -> dict[int, QueueWait]:
        """Why each queued job waits: its place, what it needs, which job or worker holds it."""
        queued = self.queue()
        holds = [(h.device, h.holder, h.pid) for h in self.store.holds()]
        return {w.job_id: w for w in explain_queue(queued, self._device_pool(), self.store.active(), holds)}

    def device_blockers(self) -> list[Blocker]:
        """What occupies each busy device (a waiting generation shows it)."""
        queued = self.store.queued()
        holds = [(h.device, h.holder, h.pid) for h in self.store.holds()]
        return occupants(self._device_pool(), self.store.active(), holds, queued, self.reserved_for_queue())

    def reserved_for_queue(self) -> set[int]:
        """Devices the first queued job will start on once inference workers give them back: an
        idle worker on one of them yields at once, and no new worker may take one."""
        return reserved_for_head(self.store.queued(), self._device_pool(), self.store.active(),
                                 [h.device for h in self.store.holds()])

    # ---- devices for other users (inference) ---------------------------------------------------
    def acquire_devices(self, holder: str, count: int = 1) -> list[int] | None:
        """Reserve `count` free devices for `holder` (GPU indices, or CPU slots < 0; engine.gpus.Device).
        Devices the head of the training queue is about to take are not handed out."""
        self._release_stale_holds()  # a reservation of a dead process must not keep anyone waiting
        held = [h.device for h in self.store.holds() if h.holder == holder]
        if held:
            return held
        identity = process_identity(os.getpid())
        for _ in range(3):  # a concurrent claim may take a device between our read and write
            taken = self.store.devices_in_use() | self.reserved_for_queue()
            free = [d for d in self._device_pool() if d not in taken]
            if len(free) < count:
                return None
            chosen = free[:count]
            if self.store.hold_devices(holder, chosen, os.getpid(), identity.start_time if identity else None):
                return chosen
        return None

    def release_devices(self, holder: str) -> None:
        if self.store.release_holds(holder):
            self.wake()

    def device_pool(self) -> list[int]:
        return self._device_pool()

    def _device_pool(self) -> list[int]:
        """GPU indices, or CPU slots -1..-cpu_slots on a machine without GPUs. A GPU machine whose
        nvidia-smi fails for a moment keeps its last known GPUs (never falls back to CPU)."""
        gpus = [g.index for g in self.gpus.list()]
        if gpus:
            self._known_gpus = gpus
        elif self._known_gpus:
            gpus = self._known_gpus
        return sorted(gpus) if gpus else cpu_pool(self.cpu_slots)

    # ---- recovery ------------------------------------------------------------------------------
    def _release_stale_holds(self) -> None:
        """Device holds of a process that is gone (an app that crashed) free their devices."""
        for hold in self.store.holds():
            if not is_same_process(hold.pid, hold.pid_start_time):
                log.info("releasing device %d of %s: its process is gone", hold.device, hold.holder)
                if self.store.release_holds_of_pid(hold.pid):
                    self.wake()

    def _recover(self) -> None:
        self._release_stale_holds()
        self.supervisor.recover()

    # ---- launching -----------------------------------------------------------------------------
    def _start_queued(self) -> None:
        pool = self._device_pool()
        used = self.store.devices_in_use()
        fixed_port = self.nodes.master_port if self.nodes is not None else None
        for job in self.store.queued():
            devices = choose_devices(job, pool, used)
            if devices is None:
                break  # strict order: later jobs never overtake (a big job is never starved)
            ports = self.store.ports_in_use()
            if fixed_port is not None and fixed_port in ports:
                break  # every node agreed on this one port: one multi-node job at a time
            port = fixed_port if fixed_port is not None else pick_master_port(ports)
            if not self.store.claim(job.id, devices, port):
                used = self.store.devices_in_use()
                continue
            used.update(devices)
            claimed = self.store.get(job.id)
            if claimed is not None:
                self._launch(claimed)

    def _launch(self, job: Job) -> None:
        if not launch_job(job, self.store, self.supervisor, self.layout, self.nodes, self.command_builder):
            self.wake()  # its devices are free again

    # ---- supervision ---------------------------------------------------------------------------
    def _supervise(self) -> None:
        self._release_stale_holds()
        self.supervisor.supervise()


__all__ = ["Scheduler"]
