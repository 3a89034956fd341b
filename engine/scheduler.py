"""The job queue: device allocation, launching, supervision and restart recovery.

Several schedulers may share one database (the app and a CLI). Only the one holding the
`scheduler.lock` file lock in the data directory launches and supervises; the others enqueue,
stop and read, and keep trying to take over, so a CLI `--follow` survives the app exiting.

Every decision is taken from the database (not from memory), so a restarted app picks up
exactly where the previous one left off; trainers live in their own sessions and keep running.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import filelock

from engine.gpus import GpuInventory
from engine.jobs import (ACTIVE_STATUSES, RESUMABLE_STATUSES, Job, JobError, JobStatus)
from engine.launcher import (LaunchSpec, Nodes, build_deepspeed_command, build_env, is_same_process,
                             pick_master_port, process_identity, spawn_process, stop_process_group,
                             train_log_path)
from engine.metrics import METRICS_FILE, FINAL_EVENTS, MetricsReader, last_final_event, read_tail
from engine.paths import REPO_ROOT, DataLayout
from engine.store.db import Database
from engine.store.jobs import JobEvent, JobStore

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
REATTACH_TAIL_BYTES = 256 << 10
CommandBuilder = Callable[[LaunchSpec], list[str]]


# ---- failure classification ---------------------------------------------------------------------
@dataclass(frozen=True)
class FailureRule:
    pattern: re.Pattern[str]
    reason: str
    hint: str


FAILURE_RULES: tuple[FailureRule, ...] = (
    FailureRule(re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I),
                "CUDA out of memory",
                "Lower the resolution or frame count, turn on activation_checkpointing, or use a "
                "smaller micro batch; another process may also be using the GPU."),
    FailureRule(re.compile(r"address already in use|EADDRINUSE|port .{0,40}(is )?in use", re.I),
                "Port in use",
                "Another process took the master port. Resume the job: it gets a new free port."),
    FailureRule(re.compile(r"ModelNotFoundError|model_index\.json|no such file or directory.{0,200}"
                           r"(model|ckpt|\.safetensors)|does not appear to have a file named", re.I),
                "Missing model files",
                "Check model.ckpt_path: it must be a diffusers folder with model_index.json and "
                "all component weights."),
    FailureRule(re.compile(r"Error while deserializing header|HeaderTooLarge|SafetensorError|"
                           r"InvalidHeaderDeserialization|incomplete metadata", re.I),
                "Corrupt safetensors file",
                "A .safetensors file is truncated or not a safetensors file (an interrupted "
                "download or copy?). Replace it and resume."),
    # Not "NCCL_": the DeepSpeed launcher prints NCCL_* settings on every GPU run.
    FailureRule(re.compile(r"NCCL error|nccl(Internal|System|UnhandledCuda|Invalid\w*)Error|"
                           r"ProcessGroupNCCL.{0,80}(error|timeout|abort)|Watchdog caught collective", re.I),
                "NCCL error",
                "Communication between GPUs failed: check that the GPUs are healthy and visible, "
                "try NCCL_P2P_DISABLE=1, and resume."),
    FailureRule(re.compile(r"ConfigError|config(uration)? error", re.I),
                "Invalid configuration",
                "Fix the named config key and resume or submit again."),
)

_SIGNAL_IN_LOG = re.compile(r"exits with return code = -(\d+)")


def classify_failure(exit_code: int | None, log_tail: str, error_message: str | None = None) -> tuple[str, str]:
    """(reason, hint) for a failed run from its exit code, log tail and the trainer's error event."""
    text = f"{error_message or ''}\n{log_tail}"
    for rule in FAILURE_RULES:
        if rule.pattern.search(text):
            return rule.reason, rule.hint
    signum = _signal_number(exit_code, log_tail)
    if signum is not None:
        name = _signal_name(signum)
        hint = ("The kernel's out-of-memory killer sends SIGKILL when host RAM runs out: check "
                "`dmesg`, lower caching_batch_size or resolution." if signum == signal.SIGKILL else
                "Something outside the studio stopped the process. Resume to continue from the "
                "last checkpoint.")
        return f"Killed by signal {signum} ({name})", hint
    if error_message:
        return error_message.splitlines()[0][:300], "See the log tail for the traceback."
    if exit_code is None:
        return "Process ended without a final event", "See the log tail; resume to continue."
    return f"Exited with code {exit_code}", "See the log tail for the error."


def _signal_number(exit_code: int | None, log_tail: str) -> int | None:
    if exit_code is not None and exit_code < 0:
        return -exit_code
    match = _SIGNAL_IN_LOG.search(log_tail)
    if match:
        return int(match.group(1))
    if exit_code is not None and exit_code > 128 and 256 - exit_code in range(1, 65):
        return 256 - exit_code  # the DeepSpeed launcher exits with (-signal) & 0xff
    return None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown"


def read_log_tail(path: str | os.PathLike | None, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 << 10) -> str:
    """Last `lines` lines of a log, reading only its end."""
    data = read_tail(path, max_bytes) if path else None
    if data is None:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def slugify(text: str, max_len: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].strip("-") or "job"


# ---- the scheduler ------------------------------------------------------------------------------
@dataclass
class _Watched:
    """A process this scheduler supervises (launched by it, or re-attached after a restart)."""

    job_id: int
    pid: int
    run_dir: Path
    log_path: Path
    reader: MetricsReader
    popen: subprocess.Popen | None = None  # when we launched it ourselves (exit code known)
    final_event: dict | None = None
    stop_thread: threading.Thread | None = None
    progress: tuple = ()


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
        self._watched: dict[int, _Watched] = {}
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
            self._watched.clear()
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
                self._watched.clear()
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
            self._watched.clear()
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
        chosen = chosen or self.layout.runs_dir / f"{job.id}-{slugify(job_name)}"
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
        on_cpu = all(d < 0 for d in pool)
        if gpus is not None:
            if not gpus:
                raise JobError("gpus: the list of GPU indices is empty")
            if len(set(gpus)) != len(gpus):
                raise JobError(f"gpus: {gpus} names a GPU twice")
            if on_cpu:
                raise JobError("gpus: this machine has no GPUs; use num_gpus for CPU ranks")
            missing = sorted(set(gpus) - set(pool))
            if missing:
                raise JobError(f"gpus: no GPU {missing} on this machine (have {sorted(pool)})")
            return ",".join(str(g) for g in sorted(gpus)), True
        count = 1 if num_gpus is None else int(num_gpus)
        if count < 1:
            raise JobError(f"num_gpus must be >= 1, got {count}")
        if count > len(pool):
            what = f"{len(pool)} CPU slot(s) (setting cpu_slots)" if on_cpu else f"{len(pool)} GPU(s)"
            raise JobError(f"num_gpus={count} but this machine has only {what}")
        return str(count), False

    def get(self, job_id: int) -> Job:
        job = self.store.get(int(job_id))
        if job is None:
            raise JobError(f"no job {job_id}")
        return job

    def list_jobs(self, owner: str | None = None, statuses: Iterable[JobStatus | str] | None = None,
                  limit: int = 50, offset: int = 0) -> list[Job]:
        return self.store.list(owner=owner, statuses=statuses, limit=limit, offset=offset)

    def count_jobs(self, owner: str | None = None, statuses: Iterable[JobStatus | str] | None = None) -> int:
        return self.store.count(owner=owner, statuses=statuses)

    def events(self, job_id: int) -> list[JobEvent]:
        """The job's state history, oldest first."""
        return self.store.events(int(job_id))

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
                _touch(Path(job.run_dir) / "stop")
            requested_at = 0.0 if force else time.time()
            self.store.transition(job.id, [JobStatus.STARTING, JobStatus.RUNNING, JobStatus.STOPPING],
                                  JobStatus.STOPPING, event="force" if force else "stop file written",
                                  stop_requested_at=requested_at)
            self.wake()
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        if not self.store.transition(int(job_id), [JobStatus.QUEUED], JobStatus.STOPPED, event="cancelled",
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
        _touch(Path(job.run_dir) / "save")

    def set_priority(self, job_id: int, priority: int) -> Job:
        self.get(job_id)
        self.store.update(int(job_id), priority=int(priority))
        self.wake()
        return self.get(job_id)

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
        return self.store.queued()

    # ---- devices for other users (inference) ---------------------------------------------------
    def acquire_devices(self, holder: str, count: int = 1) -> list[int] | None:
        """Reserve `count` free devices for `holder` (GPU indices, or [-1] for a CPU slot)."""
        held = [h.device for h in self.store.holds() if h.holder == holder]
        if held:
            return held
        identity = process_identity(os.getpid())
        for _ in range(3):  # a concurrent claim may take a device between our read and write
            free = [d for d in self._device_pool() if d not in self.store.devices_in_use()]
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
        return sorted(gpus) if gpus else [-(k + 1) for k in range(self.cpu_slots)]

    # ---- recovery ------------------------------------------------------------------------------
    def _release_stale_holds(self) -> None:
        """Device holds of a process that is gone (an app that crashed) free their devices."""
        for hold in self.store.holds():
            if not is_same_process(hold.pid, hold.pid_start_time):
                log.info("releasing device %d of %s: its process is gone", hold.device, hold.holder)
                self.store.release_holds_of_pid(hold.pid)

    def _recover(self) -> None:
        self._release_stale_holds()
        for job in self.store.active():
            if job.pid is None and job.status == JobStatus.STOPPING:
                self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.STOPPED, event="stopped before launch",
                                      ended_at=time.time(), gpus_assigned=[], master_port=None)
            elif job.pid is None:
                # Claimed but never spawned (crash in between): queue it again.
                self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.QUEUED, event="requeued after restart",
                                      gpus_assigned=[], master_port=None)
            elif is_same_process(job.pid, job.pid_start_time):
                log.info("re-attaching job %d (pid %d)", job.id, job.pid)
                self.store.add_event(job.id, "reattached", f"pid {job.pid}")
                self._watch(job, popen=None, reattach=True)
            else:
                self._finish_unwatched(job)

    def _finish_unwatched(self, job: Job) -> None:
        """The process ended while no scheduler watched: decide from the trainer's last event."""
        final = self._final_event_of_this_launch(job)
        if final is None:
            tail = read_log_tail(job.log_path)
            self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.LOST, event="process gone",
                                  ended_at=time.time(), log_tail=tail,
                                  failure_reason="The process ended while the studio was not running",
                                  failure_hint="Resume the job to continue from its last checkpoint.")
            return
        self._record_outcome(job, exit_code=None, final=final)

    @staticmethod
    def _final_event_of_this_launch(job: Job) -> dict | None:
        """The trainer's last final event, unless it predates this launch (an earlier attempt's)."""
        final = last_final_event(job.run_dir) if job.run_dir else None
        if final is not None and job.started_at and float(final.get("time") or 0) < job.started_at - 1:
            return None
        return final

    # ---- launching -----------------------------------------------------------------------------
    def _start_queued(self) -> None:
        pool = self._device_pool()
        used = self.store.devices_in_use()
        fixed_port = self.nodes.master_port if self.nodes is not None else None
        for job in self.store.queued():
            devices = self._choose_devices(job, pool, used)
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

    @staticmethod
    def _choose_devices(job: Job, pool: list[int], used: set[int]) -> list[int] | None:
        if job.gpus_explicit:
            wanted = job.requested_indices
            return wanted if not (set(wanted) & used) and set(wanted) <= set(pool) else None
        free = [d for d in pool if d not in used]
        return free[: job.requested_count] if len(free) >= job.requested_count else None

    def _launch(self, job: Job) -> None:
        run_dir = Path(job.run_dir or self.layout.runs_dir / f"{job.id}-{slugify(job.name)}")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(run_dir / "run.toml", job.config_toml)
            if self.get(job.id).status == JobStatus.STARTING:  # keep the file of a stop asked meanwhile
                (run_dir / "stop").unlink(missing_ok=True)  # a stale stop file would end the new launch
            resume = job.resume and _has_checkpoint(run_dir)
            spec = LaunchSpec(job_id=job.id, job_name=job.name, run_dir=run_dir,
                              devices=tuple(job.gpus_assigned), master_port=int(job.master_port or 0),
                              resume=resume, nodes=self.nodes, studio_home=self.layout.home)
            argv = self.command_builder(spec)
            with open(spec.log_path, "a", encoding="utf-8") as handle:
                handle.write(f"=== studio: launch {job.attempts + 1} of job {job.id} at "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
            popen = spawn_process(argv, cwd=REPO_ROOT, env=build_env(spec, None), log_path=spec.log_path)
        except Exception as exc:  # noqa: BLE001 - any launch error fails this job, not the loop
            log.exception("could not launch job %d", job.id)
            self.store.transition(job.id, ACTIVE_STATUSES, JobStatus.FAILED, event="launch failed",
                                  ended_at=time.time(), failure_reason=f"Could not start: {exc}",
                                  failure_hint="Check the studio log and the job's run directory.")
            return
        identity = process_identity(popen.pid)
        start_time = identity.start_time if identity else _create_time(popen.pid)
        self.store.update(job.id, pid=popen.pid, pid_start_time=start_time, started_at=time.time(),
                          run_dir=str(run_dir), log_path=str(spec.log_path), attempts=job.attempts + 1,
                          step=None, eta_s=None, phase="starting")
        self.store.transition(job.id, [JobStatus.STARTING], JobStatus.RUNNING, event=f"pid {popen.pid}")
        self._watch(self.get(job.id), popen=popen, reattach=False)

    def _watch(self, job: Job, popen: subprocess.Popen | None, reattach: bool) -> None:
        run_dir = Path(job.run_dir or "")
        reader = MetricsReader(run_dir / METRICS_FILE)
        if reattach:
            reader.seek_tail(REATTACH_TAIL_BYTES)
        else:
            reader.skip_to_end()  # events of earlier launches in this run dir do not count
        self._watched[job.id] = _Watched(job_id=job.id, pid=int(job.pid or 0), run_dir=run_dir,
                                         log_path=Path(job.log_path or train_log_path(run_dir, self.nodes)),
                                         reader=reader, popen=popen)

    # ---- supervision ---------------------------------------------------------------------------
    def _supervise(self) -> None:
        self._release_stale_holds()
        jobs = {job.id: job for job in self.store.active()}
        for job_id, watched in list(self._watched.items()):
            job = jobs.get(job_id)
            if job is None:  # changed outside our watch (should not happen); forget it
                self._watched.pop(job_id, None)
                continue
            self._read_progress(job, watched)
            exited, exit_code = self._exit_status(watched)
            if exited:
                self._read_progress(job, watched)
                self._watched.pop(job_id, None)
                self._record_outcome(self.get(job_id), exit_code=exit_code, final=watched.final_event,
                                     final_known=True)
                self.wake()
            elif job.status == JobStatus.STOPPING:
                self._escalate_stop(job, watched)

    def _exit_status(self, watched: _Watched) -> tuple[bool, int | None]:
        if watched.popen is not None:
            code = watched.popen.poll()
            return code is not None, code
        return not is_same_process(watched.pid, self.get(watched.job_id).pid_start_time), None

    def _read_progress(self, job: Job, watched: _Watched) -> None:
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

    def _escalate_stop(self, job: Job, watched: _Watched) -> None:
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

    def _record_outcome(self, job: Job, exit_code: int | None, final: dict | None,
                        final_known: bool = False) -> None:
        if final is None and not final_known:
            final = self._final_event_of_this_launch(job)
        kind = final.get("event") if final else None
        stop_requested = job.status == JobStatus.STOPPING or job.stop_requested_at is not None
        values: dict = {"ended_at": time.time(), "exit_code": exit_code}
        if kind == "done" and exit_code in (0, None):
            status = JobStatus.SUCCEEDED
        elif kind == "stopped" and exit_code in (0, None):
            status = JobStatus.STOPPED
        elif stop_requested and kind != "error":
            status = JobStatus.STOPPED
        elif exit_code == 0 and kind is None:
            status = JobStatus.SUCCEEDED
        else:
            status = JobStatus.FAILED
            tail = read_log_tail(job.log_path)
            message = final.get("message") if final and kind == "error" else None
            reason, hint = classify_failure(exit_code, tail, message)
            values.update(log_tail=tail, failure_reason=reason, failure_hint=hint)
        self.store.transition(job.id, ACTIVE_STATUSES, status,
                              event=f"exit {exit_code}" + (f", {kind}" if kind else ""), **values)
        log.info("job %d %s (exit %s)", job.id, status.value, exit_code)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _write_atomic(path: Path, text: str) -> None:
    # A temporary name of our own: the studios of all nodes write one shared run dir's run.toml.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _has_checkpoint(run_dir: Path) -> bool:
    """A complete DeepSpeed checkpoint (the trainer's marker) exists: --resume can succeed."""
    from engine.trainer.runfiles import latest_complete_checkpoint  # stdlib-only module

    return latest_complete_checkpoint(run_dir) is not None


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - the process may already be gone
        return None


__all__ = ["Scheduler", "classify_failure", "read_log_tail", "slugify", "FAILURE_RULES"]
