"""Why a training run failed, in words a user can act on: rules over the log tail and the
trainer's error event, then the exit code or signal."""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass


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
    if exit_code == 0:  # reached only without a done/stopped event
        return ("The trainer ended without saying it finished or stopped",
                "A process of the run was killed or crashed without a traceback (DeepSpeed's runner "
                "exits 0 even when a rank dies of a signal). See the log tail; resume to continue.")
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
