"""End-to-end trainer runs on the CPU with a tiny random Wan: real processes, real files.

`python -m engine.trainer` (one process) here; `deepspeed` launches are in test_trainer_deepspeed.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.trainer import cache as cache_mod
from tests.trainer_support import (
    REPO_ROOT,
    make_dataset,
    of_kind,
    read_events,
    run_trainer,
    trainer_cmd,
    trainer_env,
    wait_for_step,
    write_config,
)


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_single_process_run_learns_and_writes_the_run_directory(tmp_path: Path, tiny_model: Path,
                                                                  dataset: Path) -> None:
    config = write_config(tmp_path, tiny_model, dataset, epochs=8, save_every_n_epochs=4)
    run_dir = tmp_path / "run"
    result = run_trainer(trainer_cmd(config, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run_dir)
    assert all("event" in e and isinstance(e["time"], float) for e in events)

    start = of_kind(events, "start")[0]
    # 4 squares + uncaptioned image + video = 6 samples; broken.mp4 skipped; batch 1, 1 rank.
    assert start["world_size"] == 1 and start["steps_per_epoch"] == 6 and start["total_steps"] == 48
    warnings = " | ".join(e["message"] for e in of_kind(events, "warning"))
    assert "broken.mp4" in warnings and "nocaption.png" in warnings and "1 files have no caption" in warnings
    caches = of_kind(events, "cache")
    assert caches[-1]["done"] == caches[-1]["total"] == 6

    steps = of_kind(events, "step")
    assert [s["step"] for s in steps] == list(range(1, 49))
    for s in steps:
        assert {"loss", "lr", "grad_norm", "samples_per_s", "elapsed_s", "eta_s", "epoch", "total_steps"} <= set(s)
        assert np.isfinite(s["loss"]) and s["grad_norm"] > 0
    losses = [s["loss"] for s in steps]
    assert np.mean(losses[-12:]) < 0.9 * np.mean(losses[:6]), losses
    epochs = of_kind(events, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, 9)) and epochs[-1]["step"] == 48
    saves = of_kind(events, "save")
    assert [Path(s["path"]).name for s in saves] == ["epoch4", "epoch8"]
    assert events[-1]["event"] == "done" and events[-1]["step"] == 48

    for name in ("epoch4", "epoch8"):
        assert (run_dir / name / "adapter_model.safetensors").is_file()
        assert json.loads((run_dir / name / "adapter_config.json").read_text())["r"] == 8
    run_toml = (run_dir / "run.toml").read_text()
    assert "[dataset]" in run_toml and str(dataset) in run_toml

    # The saved LoRA loads in diffusers and changes what the model generates.
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_model))
    kwargs = dict(prompt="a purple square", num_frames=1, height=32, width=32, num_inference_steps=3,
                  output_type="pt")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(run_dir / "epoch8" / "adapter_model.safetensors"), adapter_name="trained")
    tuned = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert (tuned - base).abs().mean() > 1e-3

    # A second run reuses the cache (nothing left to encode) and starts from the saved LoRA: with a
    # negligible lr its own saved LoRA equals the one it started from.
    again_cfg = write_config(tmp_path, tiny_model, dataset, epochs=1, max_steps=4, **{
        "adapter.init_from_existing": str(run_dir / "epoch8"), "optimizer.lr": 1e-12})
    again = run_trainer(trainer_cmd(again_cfg, tmp_path / "run2"))
    assert again.returncode == 0, again.stderr[-3000:]
    events2 = read_events(tmp_path / "run2")
    first_cache = of_kind(events2, "cache")[0]
    assert first_cache["done"] == first_cache["total"] == 6
    # max_steps cuts the epoch short; the final LoRA is then a step folder.
    assert of_kind(events2, "start")[0]["total_steps"] == 4 and len(of_kind(events2, "step")) == 4
    assert [Path(e["path"]).name for e in of_kind(events2, "save")] == ["step4"]
    from safetensors.torch import load_file

    before = load_file(str(run_dir / "epoch8" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "run2" / "step4" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key].float(), before[key].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_sigterm_stops_then_resume_reproduces_the_uninterrupted_run(tmp_path: Path, tiny_model: Path) -> None:
    data = make_dataset(tmp_path / "data", video=False, corrupt_video=False, uncaptioned=False)
    config = write_config(tmp_path, tiny_model, data, epochs=6, lr_scheduler="cosine", warmup_steps=3,
                          gradient_accumulation_steps=2, caption_dropout_rate=0.5,
                          **{"adapter.dropout": 0.1, "model.timestep_sample_method": "logit_normal"})
    # 4 samples, accumulation 2 -> 2 steps per epoch, 12 steps. Caption dropout: its draws replay on resume too.
    full, run = tmp_path / "full", tmp_path / "interrupted"
    # The uninterrupted reference trains beside the run that gets stopped: one CPU thread each
    # (engine/threads.py), and the cache they share takes concurrent writers (per-process temp files).
    reference_proc, proc = (subprocess.Popen(trainer_cmd(config, run_dir), cwd=REPO_ROOT, env=trainer_env(),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                            for run_dir in (full, run))
    try:
        wait_for_step(run, 3, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        _, reference_stderr = reference_proc.communicate(timeout=240)
    finally:
        for started in (proc, reference_proc):
            if started.poll() is None:
                started.kill()
    assert reference_proc.returncode == 0, reference_stderr[-3000:]
    reference = {e["step"]: e for e in of_kind(read_events(full), "step")}
    assert len(reference) == 12
    assert proc.returncode == 0, stderr[-3000:]
    events = read_events(run)
    stopped = of_kind(events, "stopped")
    assert stopped, "no stopped event"
    stop_step = stopped[0]["step"]
    assert 3 <= stop_step < 12, f"stopped at {stop_step}: too late to test resume"
    saved = [e for e in of_kind(events, "save") if e["step"] == stop_step]
    assert saved and (Path(saved[0]["path"]) / "adapter_model.safetensors").is_file()  # epochN/ or stepN/
    assert (run / f"global_step{stop_step}" / "complete.json").is_file()
    assert of_kind(events, "checkpoint")[-1]["step"] == stop_step

    # A partial checkpoint (crash mid-save: no completion marker) must be ignored.
    (run / "global_step99").mkdir()
    (run / "global_step99" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (run / "latest").write_text("global_step99")

    # A stop file left over from before this process must not stop the resumed run.
    (run / "stop").touch()
    os.utime(run / "stop", (time.time() - 60, time.time() - 60))

    resumed = run_trainer(trainer_cmd(config, run, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = read_events(run)
    starts = of_kind(events, "start")
    assert starts[-1]["resumed_from_step"] == stop_step
    after = [e for e in of_kind(events, "step") if e["time"] >= starts[-1]["time"]]
    assert [e["step"] for e in after] == list(range(stop_step + 1, 13))
    for e in after:
        ref = reference[e["step"]]
        assert e["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5), e["step"]
        assert e["lr"] == pytest.approx(ref["lr"], rel=1e-6)
    assert events[-1]["event"] == "done"
    fingerprint = cache_mod.model_fingerprint(tiny_model)
    assert cache_mod.text_path(tmp_path / "cache", "wan", fingerprint, "").is_file()  # the dropped captions' embedding

    from safetensors.torch import load_file

    a = load_file(str(full / "epoch6" / "adapter_model.safetensors"))
    b = load_file(str(run / "epoch6" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-4)


def test_bad_config_value_exits_2_with_the_key_path(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    config = write_config(tmp_path, tiny_model, dataset, **{"optimizer.lr": -1.0, "dataset.frame_buckets": [1, 6]})
    result = run_trainer(trainer_cmd(config, tmp_path / "run"))
    assert result.returncode == 2
    errors = of_kind(read_events(tmp_path / "run"), "error")
    assert errors and "optimizer.lr: must be > 0" in errors[0]["message"]
    assert "dataset.frame_buckets[1]" in errors[0]["message"]
    assert "optimizer.lr" in result.stderr


def test_empty_dataset_is_a_clear_error_before_model_work(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no media here")
    config = write_config(tmp_path, tiny_model, empty)
    run_dir = tmp_path / "run"
    result = run_trainer(trainer_cmd(config, run_dir))
    assert result.returncode == 2, result.stderr[-2000:]
    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["error"]
    assert "dataset is empty" in events[0]["message"] and str(empty) in events[0]["message"]
    assert not (tmp_path / "cache").exists()


def test_missing_model_is_a_clear_error(tmp_path: Path, dataset: Path) -> None:
    config = write_config(tmp_path, tmp_path / "no_such_model", dataset)
    result = run_trainer(trainer_cmd(config, tmp_path / "run"))
    assert result.returncode == 2
    (error,) = of_kind(read_events(tmp_path / "run"), "error")
    assert "no_such_model" in error["message"] and "neither 'demo'" in error["message"]


def test_lora_gradients_are_clipped_in_one_pass_that_reports_the_norm() -> None:
    from engine.trainer.loop import _clip_lora_grads

    def params_with_grads() -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
        params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5
        return params

    clipped = params_with_grads()
    assert float(_clip_lora_grads(clipped, 1.0)) == pytest.approx(5.0)  # the norm before clipping
    assert float(torch.cat([p.grad for p in clipped]).norm()) == pytest.approx(1.0, rel=1e-4)
    untouched = params_with_grads()
    assert float(_clip_lora_grads(untouched, 0.0)) == pytest.approx(5.0)  # 0 = report only
    assert untouched[1].grad.item() == 4.0
