"""Failure classification from exit code, log tail and the trainer's error event."""
from __future__ import annotations

import pytest

from engine.failures import classify_failure
from engine.rundir import read_log_tail
from engine.rundir import slugify


@pytest.mark.parametrize("exit_code, log, message, reason", [
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB", None, "CUDA out of memory"),
    (1, "RuntimeError: The server socket has failed to listen on any local network address. "
        "port: 29500, useIpv6: 0, code: -98, name: EADDRINUSE, message: address already in use", None, "Port in use"),
    (2, "", "ModelNotFoundError: /models/wan is not a diffusers folder (no model_index.json)", "Missing model files"),
    (1, "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge", None,
     "Corrupt safetensors file"),
    (1, "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error",
     None, "NCCL error"),
    (-9, "", None, "Killed by signal 9 (SIGKILL)"),
    (247, "[launch.py:259:sigkill_handler] [...] exits with return code = -9", None, "Killed by signal 9 (SIGKILL)"),
    (-15, "", None, "Killed by signal 15 (SIGTERM)"),
    (2, "", "config error: optimizer.lr: must be > 0", "Invalid configuration"),
    (1, "ValueError: something odd", "something odd happened\nmore", "something odd happened"),
    (3, "plain failure", None, "Exited with code 3"),
    (None, "", None, "Process ended without a final event"),
])
def test_classification(exit_code, log, message, reason) -> None:
    got_reason, hint = classify_failure(exit_code, log, message)
    assert got_reason == reason
    assert hint  # every failure comes with something to do


def test_sigkill_names_the_oom_killer_only_when_the_cgroup_counted_one() -> None:
    oom_reason, oom_hint = classify_failure(-9, "", None, oom_killed=True)
    assert "out-of-memory killer" in oom_reason and "Host RAM ran out" in oom_hint
    manual_reason, manual_hint = classify_failure(-9, "", None, oom_killed=False)
    assert manual_reason == "Killed by signal 9 (SIGKILL)" and manual_hint.startswith("Not the out-of-memory killer")
    _, unknown_hint = classify_failure(-9, "", None, oom_killed=None)
    assert "out-of-memory killer" in unknown_hint and "kill -9" in unknown_hint  # both causes named


def test_ranks_left_behind_by_a_dead_launcher_are_named() -> None:
    reason, hint = classify_failure(0, "", None, orphans=2)
    assert reason == "The launcher ended while 2 process(es) of the run still ran" and "Resume" in hint
    assert classify_failure(-9, "", None, orphans=2)[0] == "Killed by signal 9 (SIGKILL)"  # the signal says more
    assert "without saying it finished" in classify_failure(0, "", None)[0]


def test_log_tail_reads_the_last_lines(tmp_path) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    tail = read_log_tail(log, lines=50)
    assert tail.splitlines()[0] == "line 950" and tail.splitlines()[-1] == "line 999"
    assert read_log_tail(tmp_path / "missing.log") == "" and read_log_tail(None) == ""


def test_slug() -> None:
    assert slugify("My Purple Star LoRA v2!") == "my-purple-star-lora-v2"
    assert slugify("###") == "job"


def test_launcher_noise_is_not_an_nccl_error() -> None:
    log = "[INFO] [launch.py:139:main] 0 NCCL_VERSION=2.21.5\n[INFO] [launch.py:146:main] 0 NCCL_P2P_DISABLE=1\n"
    assert classify_failure(1, log)[0] == "Exited with code 1"
