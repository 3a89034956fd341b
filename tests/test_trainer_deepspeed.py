"""Real `deepspeed` launches on the CPU: one rank, and two ranks with save/stop files and resume."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.families.wan_random import build_random_wan
from tests.trainer_support import (
    REPO_ROOT,
    make_dataset,
    of_kind,
    read_events,
    run_trainer,
    trainer_env,
    wait_for_step,
    write_config,
)

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_cmd(num_ranks: int, config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), "--module",
            "engine.trainer", "--config", str(config), "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_wan(tmp_path_factory.mktemp("model") / "tiny_wan", preset="tiny", seed=1)


@pytest.mark.slow
def test_one_rank_under_deepspeed_with_zero1(tmp_path: Path, tiny_model: Path) -> None:
    data = make_dataset(tmp_path / "data", images=2, video=False, corrupt_video=False, uncaptioned=False)
    config = write_config(tmp_path, tiny_model, data, epochs=2, zero_stage=1, checkpoint_every_n_minutes=1e-5,
                          save_every_n_steps=3, activation_checkpointing=True)
    result = run_trainer(deepspeed_cmd(1, config, tmp_path / "run"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    events = read_events(tmp_path / "run")
    assert of_kind(events, "start")[0]["world_size"] == 1
    steps = of_kind(events, "step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["grad_norm"] is not None and s["grad_norm"] > 0 for s in steps)
    assert events[-1]["event"] == "done"
    # save_every_n_steps replaces the per-epoch default; the final LoRA is always written.
    assert [Path(e["path"]).name for e in of_kind(events, "save")] == ["step3", "epoch2"]
    assert (tmp_path / "run" / "epoch2" / "adapter_model.safetensors").is_file()
    # A checkpoint every ~1 ms of wall time: one after every step but the last.
    assert [c["step"] for c in of_kind(events, "checkpoint")] == [1, 2, 3]
    assert all((tmp_path / "run" / f"global_step{s}" / "complete.json").is_file() for s in (1, 2, 3))


@pytest.mark.slow
def test_two_ranks_zero2_save_stop_and_resume(tmp_path: Path, tiny_model: Path) -> None:
    data = make_dataset(tmp_path / "data", images=8, video=False, corrupt_video=False, uncaptioned=False)
    # 8 samples over 2 ranks -> 4 steps per epoch, 5 epochs = 20 steps.
    config = write_config(tmp_path, tiny_model, data, epochs=5, zero_stage=2, lr_scheduler="linear",
                          warmup_steps=2)

    full, run = tmp_path / "full", tmp_path / "interrupted"
    # The uninterrupted reference trains beside the run that gets stopped (the shared cache takes
    # concurrent writers: per-process temp files).
    reference_proc, proc = (subprocess.Popen(deepspeed_cmd(2, config, run_dir), cwd=REPO_ROOT, env=trainer_env(),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                            for run_dir in (full, run))
    try:
        wait_for_step(run, 2, proc)
        (run / "save").touch()
        deadline = time.monotonic() + 120
        while not of_kind(read_events(run), "save") and time.monotonic() < deadline:
            time.sleep(0.02)
        (run / "stop").touch()
        _, stderr = proc.communicate(timeout=180)
        _, reference_stderr = reference_proc.communicate(timeout=240)
    finally:
        for started in (proc, reference_proc):
            if started.poll() is None:
                started.kill()
    assert reference_proc.returncode == 0, reference_stderr[-3000:]
    events = read_events(full)
    start = of_kind(events, "start")[0]
    assert start["world_size"] == 2 and start["steps_per_epoch"] == 4 and start["total_steps"] == 20
    reference = {e["step"]: e for e in of_kind(events, "step")}
    assert sorted(reference) == list(range(1, 21)) and reference[20]["lr"] < reference[3]["lr"]
    assert proc.returncode == 0, stderr[-3000:]
    events = read_events(run)
    save_step = of_kind(events, "save")[0]["step"]
    stop_step = of_kind(events, "stopped")[0]["step"]
    assert 2 <= save_step <= stop_step < 20
    assert not (run / "save").exists() and not (run / "stop").exists()  # consumed
    tag = f"global_step{stop_step}"
    assert (run / tag / "complete.json").is_file()
    assert {p.name for p in (run / tag).glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}

    resumed = run_trainer(deepspeed_cmd(2, config, run, "--resume"))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    events = read_events(run)
    last_start = of_kind(events, "start")[-1]
    assert last_start["resumed_from_step"] == stop_step
    after = [e for e in of_kind(events, "step") if e["time"] >= last_start["time"]]
    assert [e["step"] for e in after] == list(range(stop_step + 1, 21))
    for e in after:
        assert e["loss"] == pytest.approx(reference[e["step"]]["loss"], rel=1e-4, abs=1e-5), e["step"]
        assert e["lr"] == pytest.approx(reference[e["step"]]["lr"], rel=1e-6)
    assert events[-1]["event"] == "done" and events[-1]["step"] == 20
