"""Why a training run failed, in words a user can act on: rules over the log tail and the
trainer's error event, then the exit code or signal."""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path


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
# The trainer adds the planner's cheapest change to a CUDA OOM error (engine.planner.advice_after_oom).
_PLANNER_ADVICE = re.compile(r"planner suggests: (.+)")


def _with_planner_advice(rule: FailureRule, text: str) -> str:
    advice = _PLANNER_ADVICE.search(text) if rule.reason == "CUDA out of memory" else None
    if advice is None:
        return rule.hint
    return f"The planner's cheapest change for this GPU: {advice.group(1).strip()}. {rule.hint}"


def classify_failure(exit_code: int | None, log_tail: str, error_message: str | None = None, *,
                     oom_killed: bool | None = None, orphans: int = 0) -> tuple[str, str]:
    """(reason, hint) for a failed run from its exit code, log tail and the trainer's error event.
    `oom_killed`: whether the memory cgroup counted an out-of-memory kill during the run (None:
    not readable here). `orphans`: processes of the run still alive when its launcher ended."""
    text = f"{error_message or ''}\n{log_tail}"
    for rule in FAILURE_RULES:
        if rule.pattern.search(text):
            return rule.reason, _with_planner_advice(rule, text)
    signum = _signal_number(exit_code, log_tail)
    if signum is not None:
        return _signal_failure(signum, oom_killed)
    if orphans and not error_message:  # DeepSpeed's launcher died (its runner still exits 0)
        return (f"The launcher ended while {orphans} process(es) of the run still ran",
                "A process between the studio and the ranks (DeepSpeed's runner or launcher) was killed or "
                f"crashed; the studio stopped the ranks left behind. {_RESUME}")
    if error_message:
        return error_message.splitlines()[0][:300], "See the log tail for the traceback."
    if exit_code is None:
        return "Process ended without a final event", "See the log tail; resume to continue."
    if exit_code == 0:  # reached only without a done/stopped event
        return ("The trainer ended without saying it finished or stopped",
                "A process of the run was killed or crashed without a traceback (DeepSpeed's runner "
                "exits 0 even when a rank dies of a signal). See the log tail; resume to continue.")
    return f"Exited with code {exit_code}", "See the log tail for the error."


_RESUME = "Resume to continue from the last checkpoint."


def _signal_failure(signum: int, oom_killed: bool | None) -> tuple[str, str]:
    if signum != signal.SIGKILL:
        return (f"Killed by signal {signum} ({_signal_name(signum)})",
                f"Something outside the studio stopped the process. {_RESUME}")
    if oom_killed:
        return ("Killed by the out-of-memory killer (signal 9)",
                "Host RAM ran out (the memory cgroup counted an OOM kill during the run): lower "
                "caching_batch_size, resolution, frames or the number of ranks, then resume.")
    if oom_killed is False:
        return ("Killed by signal 9 (SIGKILL)",
                "Not the out-of-memory killer (the memory cgroup counted no OOM kill during the run): "
                f"a person or a tool killed it (kill -9, a cluster scheduler). {_RESUME}")
    return ("Killed by signal 9 (SIGKILL)",
            "Either the kernel's out-of-memory killer (host RAM ran out: check `dmesg`, lower "
            f"caching_batch_size or resolution) or a person or tool (kill -9). {_RESUME}")


def oom_kill_count() -> int | None:
    """OOM kills counted by this process's memory cgroup (v2 memory.events, v1 memory.oom_control);
    None where neither is readable. Processes the studio starts share its cgroup."""
    for path in _memory_cgroup_files():
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        except OSError:
            continue
    return None


def _memory_cgroup_files() -> list[Path]:
    files: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            files.append(Path("/sys/fs/cgroup") / where.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            files.append(Path("/sys/fs/cgroup/memory") / where.lstrip("/") / "memory.oom_control")
    return files


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
