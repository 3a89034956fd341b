"""The run directory's owner: LoRA saves ordered by the step they were saved at, control requests,
checkpoints and log tails."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine.rundir import RunDir, read_log_tail
from tests.trainer_support import save_lora_file as save


def test_loras_are_ordered_by_the_step_they_were_saved_at(tmp_path: Path) -> None:
    # 50 steps an epoch: step30 (save-now), epoch1 at step 50, step70, epoch2 at step 100.
    for label, step, epoch in (("epoch2", 100, 2), ("step30", 30, 1), ("epoch1", 50, 1), ("step70", 70, 2)):
        save(tmp_path, label, step, epoch)
    (tmp_path / "global_step70").mkdir()
    (tmp_path / "step90").mkdir()  # no LoRA file inside: not a save
    files = RunDir(tmp_path)
    assert [(s.label, s.step, s.epoch) for s in files.loras()] == [
        ("step30", 30, 1), ("epoch1", 50, 1), ("step70", 70, 2), ("epoch2", 100, 2)]
    assert files.newest_lora().label == "epoch2"
    # A save-now after the last epoch save is newer, although "epoch" sorts before "step" by name.
    save(tmp_path, "step120", 120, 3)
    assert files.newest_lora().label == "step120"
    # Saves of older trainers without metadata: a stepN folder's number is its step.
    save(tmp_path, "step130", None)
    assert files.newest_lora().label == "step130"
    assert RunDir(tmp_path / "missing").loras() == [] and RunDir(tmp_path / "missing").newest_lora() is None


def test_control_requests_are_consumed_and_stale_ones_discarded(tmp_path: Path) -> None:
    files = RunDir(tmp_path)
    assert files.take_control_request() == (False, False)
    files.request_save()
    stop_id = files.request_stop()
    assert json.loads((tmp_path / "stop").read_text())["id"] == stop_id
    assert files.take_control_request() == (True, True)
    assert files.take_control_request() == (False, False)  # consumed: a resume does not re-trigger
    # Staleness is the request's own time, not the file's mtime (a copy or a touch changes that)...
    files.request_stop()
    launched = time.time() + 0.5
    os.utime(tmp_path / "stop", (launched + 60, launched + 60))
    files.discard_stale_control_files(older_than=launched)
    assert not (tmp_path / "stop").exists()
    # ... and a request made after the launch is kept for it.
    files.request_save()
    files.discard_stale_control_files(older_than=time.time() - 10)
    assert files.take_control_request() == (True, False)
    # A hand-made `touch stop` counts from its mtime.
    (tmp_path / "stop").touch()
    files.discard_stale_control_files(older_than=time.time() - 10)
    assert files.take_control_request() == (False, True)


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    files = RunDir(tmp_path)
    assert files.latest_complete_checkpoint() is None
    for step in (10, 20, 30):
        (tmp_path / f"global_step{step}").mkdir()
    files.mark_checkpoint_complete("global_step10", 10, 1)
    files.mark_checkpoint_complete("global_step20", 20, 2)
    assert files.latest_complete_checkpoint() == ("global_step20", 20)  # 30 is partial (a crash mid-save)


def test_config_and_logs(tmp_path: Path) -> None:
    files = RunDir(tmp_path / "run")
    files.write_config('epochs = 1\n')
    assert files.config.read_text() == "epochs = 1\n" and [p.name for p in files.path.iterdir()] == ["run.toml"]
    assert files.log().name == "train.log" and files.log(0).name == "train.log"
    assert files.log(2).name == "train.node2.log"
    files.log().write_text("".join(f"line {i}\n" for i in range(100)))
    assert read_log_tail(files.log(), 3) == "line 97\nline 98\nline 99"
    # Reading only the end: a first line cut by the byte limit is dropped.
    assert read_log_tail(files.log(), lines=None, max_bytes=20) == "line 98\nline 99"
    assert read_log_tail(None) == "" and read_log_tail(tmp_path / "missing.log") == ""
