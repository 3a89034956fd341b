"""CLI error paths and output formatting (no process is launched here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.jobs import Job, JobStatus
from studio.cli import main
from studio.cli.jobs import exit_status, progress_line


def run_cli(capsys: pytest.CaptureFixture, home: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_rejects_bad_input_clearly(studio_home: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, studio_home, "train", str(tmp_path / "nope.toml"))
    assert code == 2 and "config file not found" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('output_dir = "o"\n[model]\nckpt_path = "demo"\n[optimizer]\nlr = 0\n'
                   f'[dataset]\n[[dataset.directory]]\npath = "{tmp_path}"\n')
    code, _, err = run_cli(capsys, studio_home, "train", str(bad))
    assert code == 2 and "optimizer.lr: must be > 0" in err
    good = tmp_path / "good.toml"
    good.write_text(bad.read_text().replace("lr = 0", "lr = 1e-4"))
    code, _, err = run_cli(capsys, studio_home, "train", str(good))  # refused before queueing
    assert code == 2 and "the dataset is empty: no trainable item, 0 media files" in err
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    code, _, err = run_cli(capsys, studio_home, "train", str(good), "--gpus", "0")
    assert code == 2 and "no GPUs" in err
    code, _, err = run_cli(capsys, studio_home, "train", str(good), "--gpus", "a,b")
    assert code == 2 and "--gpus: expected indices" in err
    code, out, _ = run_cli(capsys, studio_home, "jobs", "list")
    assert code == 0 and out.strip() == "ID  STATUS  NAME  OWNER  DEVICES  PROGRESS  CREATED\nno jobs"


def test_jobs_commands_on_unknown_ids(studio_home: Path, capsys) -> None:
    for command in ("show", "logs", "stop", "save", "resume", "cancel"):
        code, _, err = run_cli(capsys, studio_home, "jobs", command, "42")
        assert code == 2 and "no job 42" in err, command
    code, _, err = run_cli(capsys, studio_home, "jobs", "list", "--status", "exploded")
    assert code == 2 and "--status" in err


def test_every_settings_flag_reaches_the_settings(studio_home: Path, capsys) -> None:
    # The inference flags were once dropped by the CLI (a hand-kept list of names) and had no effect.
    code, _, err = run_cli(capsys, studio_home, "--infer-step-cache", "-1", "jobs", "list")
    assert code == 2 and "infer_step_cache" in err
    code, _, err = run_cli(capsys, studio_home, "--node-rank", "0", "jobs", "list")
    assert code == 2 and "node_rank" in err


def job(**values) -> Job:
    return Job(id=3, kind="train", name="n", owner="o", **values)


def test_progress_line_and_exit_status() -> None:
    running = job(status=JobStatus.RUNNING, step=50, total_steps=200, last_loss=0.0312, eta_s=200)
    assert progress_line(running) == "[job 3] running   |#####...............| 50/200 loss 0.0312 ETA 3m20s"
    assert progress_line(job(status=JobStatus.RUNNING, phase="caching 1/4")) == "[job 3] running   caching 1/4"
    assert exit_status(job(status=JobStatus.SUCCEEDED, exit_code=0)) == 0
    assert exit_status(job(status=JobStatus.STOPPED, exit_code=0)) == 0
    assert exit_status(job(status=JobStatus.FAILED, exit_code=2)) == 2
    assert exit_status(job(status=JobStatus.FAILED, exit_code=-9)) == 1
    assert exit_status(job(status=JobStatus.LOST)) == 1
