"""The only place that spawns processes.

Every process starts in its own session (so its process group is ours to signal and survives an
app restart), writes stdout/stderr to a log file, and is identified by pid + start time so a
recycled pid is never mistaken for our trainer. The DeepSpeed command line is built here too.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from engine.gpus import on_cpu, process_placement
from engine.paths import REPO_ROOT
from engine.rundir import RunDir

log = logging.getLogger(__name__)

TRAINER_MODULE = "engine.trainer"
PORT_RANGE = (29500, 30499)
START_TIME_TOLERANCE_S = 0.5  # create_time is derived from clock ticks since boot


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: float

    def matches(self, pid: int | None, start_time: float | None) -> bool:
        return (pid == self.pid and start_time is not None
                and abs(start_time - self.start_time) <= START_TIME_TOLERANCE_S)


def spawn_process(argv: Sequence[str], *, cwd: str | os.PathLike, env: Mapping[str, str],
                  log_path: str | os.PathLike | None, stdin: int | IO[Any] | None = None,
                  stdout: int | IO[Any] | None = None, die_with_parent: bool = False) -> subprocess.Popen:
    """Start `argv` in a new session. Output goes to `log_path` (appended) unless `stdout` is given
    (e.g. subprocess.PIPE for a worker we talk to); stderr then still goes to the log file.
    `die_with_parent`: the child gets SIGTERM when this process dies, even by SIGKILL (Linux), for
    helpers like inference workers that must not outlive the app or CLI that feeds them (trainers
    must: they survive an app restart). The kernel ties this to the spawning *thread*, not the
    process: spawn such a child from a thread that lives as long as it does (the inference slot's)."""
    log_file = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
    try:
        process = subprocess.Popen(
            list(argv), cwd=str(cwd), env=dict(env), start_new_session=True,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else (log_file or subprocess.DEVNULL),
            stderr=log_file if log_file is not None else subprocess.DEVNULL,
            preexec_fn=_parent_death_signal(os.getpid()) if die_with_parent else None,
        )
    finally:
        if log_file is not None:
            log_file.close()  # the child has its own descriptor
    log.info("spawned pid %d: %s", process.pid, " ".join(map(str, argv))[:500])
    return process


def _parent_death_signal(parent_pid: int):
    """A preexec function asking the kernel for SIGTERM when the parent dies (prctl
    PR_SET_PDEATHSIG); None where that does not exist. Looked up before the fork: after it only the
    prctl call and a getppid run (safe in a threaded parent)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os._exit(1)

    return arm


def worker_env(devices: Sequence[int], base: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """(environment, torch device) of a one-process helper (inference worker) on `devices`."""
    device, visible = process_placement(tuple(devices))
    env = gpu_order_env(dict(os.environ if base is None else base))
    env["CUDA_VISIBLE_DEVICES"] = visible
    env["PYTHONUNBUFFERED"] = "1"
    return env, device


def process_identity(pid: int | None) -> ProcessIdentity | None:
    """pid + start time of a live process; None when gone (zombies count as gone)."""
    if pid is None or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return ProcessIdentity(pid=pid, start_time=proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_same_process(pid: int | None, start_time: float | None) -> bool:
    identity = process_identity(pid)
    return identity is not None and identity.matches(pid, start_time)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    members: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
        return False


def wait_group_gone(pgid: int, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Zombies do not count: whoever spawned the leader collects its exit status."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def stop_process_group(pid: int, grace_s: float = 10.0, kill_wait_s: float = 10.0) -> bool:
    """SIGTERM the process group led by `pid`, then SIGKILL whatever is left after `grace_s`.

    Returns True when no process of the group is alive afterwards.
    """
    if not signal_group(pid, signal.SIGTERM):
        return True
    if wait_group_gone(pid, grace_s):
        return True
    log.warning("process group %d ignored SIGTERM for %.0f s; sending SIGKILL", pid, grace_s)
    signal_group(pid, signal.SIGKILL)
    gone = wait_group_gone(pid, kill_wait_s)
    if not gone:
        log.error("process group %d still has live processes after SIGKILL", pid)
    return gone


def job_processes(pgid: int | None, run_dir: str | os.PathLike | None) -> list[psutil.Process]:
    """Live processes of a job's process group. The group number is the pid of the process the
    launcher started; once that process is gone the number can be reused, so the group counts as
    the job's only while one of its members names the run directory on its command line (the
    runner, DeepSpeed's launcher and every rank do)."""
    if not pgid or not run_dir:
        return []
    members = group_members(pgid)
    mark = str(run_dir)
    return members if any(mark in " ".join(_command_line(p)) for p in members) else []


@dataclass(frozen=True)
class Reaped:
    found: int  # processes of the job still alive when reaping began (0: it had ended on its own)
    survivors: tuple[int, ...]  # pids alive even after SIGKILL (uninterruptible I/O); normally none


def reap_job(pgid: int | None, run_dir: str | os.PathLike | None, grace_s: float, *,
             own_group: bool = False) -> Reaped:
    """End every process left of a job: SIGTERM to its group, SIGKILL after `grace_s`. `own_group`:
    the caller launched the group and watched its leader until now, so the group is the job's even
    if no member names the run dir."""
    left = group_members(pgid) if own_group and pgid else job_processes(pgid, run_dir)
    if not left:
        return Reaped(0, ())
    log.info("reaping %d process(es) left of process group %d", len(left), pgid)
    stop_process_group(pgid, grace_s)
    return Reaped(len(left), tuple(p.pid for p in group_members(pgid)))


def _command_line(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


# ---- master ports -------------------------------------------------------------------------------
def port_is_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise
    return True


def pick_master_port(exclude: Collection[int], port_range: tuple[int, int] = PORT_RANGE) -> int:
    """A port nobody listens on and no other job of ours has recorded."""
    low, high = port_range
    start = random.randint(low, high)
    for offset in range(high - low + 1):
        port = low + (start - low + offset) % (high - low + 1)
        if port not in exclude and port_is_free(port):
            return port
    raise RuntimeError(f"no free master port in {low}-{high}")


# ---- several machines ------------------------------------------------------------------------------
_HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)\b")  # as DeepSpeed reads it


def read_hostfile(path: Path) -> dict[str, int]:
    """host -> slots, in file order (DeepSpeed numbers nodes in this order). Checked here because
    DeepSpeed's runner treats a missing hostfile as "run on this machine only", without an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise ValueError(f"{path} line {number}: expected 'HOST slots=N', got {line!r}")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise ValueError(f"{path} line {number}: host {host} is listed twice")
        if slots < 1:
            raise ValueError(f"{path} line {number}: {host} needs slots >= 1")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"{path} lists no hosts (lines 'HOST slots=N')")
    return hosts


def included_hosts(hosts: dict[str, int], include: str) -> list[str]:
    """The hosts a DeepSpeed `--include` filter (`host0:0,1@host1`) keeps, in hostfile order."""
    wanted: set[str] = set()
    for part in include.split("@"):
        host, _, slots = part.partition(":")
        if host not in hosts:
            raise ValueError(f"{include!r} names {host!r}, which is not in the hostfile")
        try:
            numbers = [int(s) for s in slots.split(",")] if slots else []
        except ValueError:
            raise ValueError(f"{include!r}: slots of {host} must be numbers, like {host}:0,1") from None
        if any(not 0 <= n < hosts[host] for n in numbers):
            raise ValueError(f"{include!r}: {host} has slots 0..{hosts[host] - 1}")
        wanted.add(host)
    return [host for host in hosts if host in wanted]


@dataclass(frozen=True)
class Nodes:
    """A job over several machines through DeepSpeed's launcher. Without `node_rank`, one runner
    reaches every host of the hostfile by ssh/pdsh. With it (--no_ssh), the same studio command
    runs on every node, each launching its own ranks; they meet at master_addr:master_port, which
    therefore must be fixed rather than picked at random per job."""

    hostfile: Path
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    include: str | None = None

    @property
    def no_ssh(self) -> bool:
        return self.node_rank is not None

    def runner_args(self) -> list[str]:
        argv = ["--hostfile", str(self.hostfile)]
        if self.include:
            argv += ["--include", self.include]
        if self.master_addr:  # else DeepSpeed asks the first host over ssh (`hostname -I`)
            argv += ["--master_addr", self.master_addr]
        if self.no_ssh:
            argv += ["--no_ssh", "--node_rank", str(self.node_rank)]
        return argv


def train_log_path(run_dir: Path, nodes: Nodes | None) -> Path:
    """This node's log of a run (node K > 0 of a no_ssh run has its own: engine.rundir)."""
    return RunDir(run_dir).log(nodes.node_rank if nodes is not None else None)


# ---- the DeepSpeed command line ----------------------------------------------------------------
@dataclass(frozen=True)
class LaunchSpec:
    """What one launch of a training job needs. `devices`: GPU indices, or CPU slots (< 0)."""

    job_id: int
    job_name: str
    run_dir: Path
    devices: tuple[int, ...]
    master_port: int
    resume: bool = False
    nodes: Nodes | None = None
    studio_home: Path | None = None
    control_since: float | None = None  # stop/save requests older than this are an earlier launch's

    @property
    def config_path(self) -> Path:
        return RunDir(self.run_dir).config

    @property
    def log_path(self) -> Path:
        return train_log_path(self.run_dir, self.nodes)

    @property
    def on_cpu(self) -> bool:
        return on_cpu(self.devices)


def deepspeed_executable() -> list[str]:
    """The `deepspeed` runner next to this interpreter, else the runner module."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def build_deepspeed_command(spec: LaunchSpec, module: str = TRAINER_MODULE) -> list[str]:
    """`deepspeed --include=localhost:<ids> --master_port P --module engine.trainer --config ...`.

    On a CPU machine `--num_gpus N` gives N ranks (DeepSpeed 0.19.8 ignores --include there and a
    hostfile would trigger an ssh check). Several machines (`spec.nodes`) replace the device
    selection with the hostfile; their fixed master port, when set, wins (every node must agree).
    """
    argv = deepspeed_executable()
    nodes = spec.nodes
    if nodes is not None:
        argv += nodes.runner_args()
    elif spec.on_cpu:
        argv += ["--num_gpus", str(len(spec.devices))]
    else:
        argv += [f"--include=localhost:{','.join(str(d) for d in sorted(spec.devices))}"]
    port = nodes.master_port if nodes is not None and nodes.master_port else spec.master_port
    argv += ["--master_port", str(port), "--module", module,
             "--config", str(spec.config_path), "--run-dir", str(spec.run_dir)]
    if spec.resume:
        argv.append("--resume")
    if spec.control_since is not None:
        argv += ["--control-since", repr(spec.control_since)]  # exact: rounding up would drop a fresh stop
    return argv


def gpu_order_env(env: dict[str, str]) -> dict[str, str]:
    """CUDA numbers GPUs fastest-first by default, nvidia-smi by PCI bus: make CUDA follow the bus
    order so "GPU 1" in the GPUs tab, a job's --gpus and the process's device are the same card."""
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def build_env(spec: LaunchSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = gpu_order_env(dict(os.environ if base is None else base))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if spec.studio_home is not None:
        env["STUDIO_HOME"] = str(spec.studio_home)
    # The runner turns CUDA_VISIBLE_DEVICES into --include unless we pass our own selection.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env
