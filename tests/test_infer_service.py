"""End to end: InferenceService -> real worker process -> real WanPipeline on the demo model
-> H.264 files -> gallery records in SQLite. One warm worker serves the whole module."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.families.wan_random import build_random_wan
from engine.gallery import Gallery
from engine.inference.random_lora import random_lora
from engine.inference.request import InferRequest, LoraSpec
from engine.inference.service import TERMINAL_STATES, InferenceService
from engine.lora import save_lora
from engine.media import probe_video, read_video
from engine.models import resolve_model
from engine.paths import DataLayout
from engine.store.db import Database

pytestmark = pytest.mark.slow
WAIT_S = 240.0  # a loaded 2-core machine: generous, with polling


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("infer_assets")
    model = resolve_model("demo")  # the embedded demo model (a real trained Wan of tiny size)
    return {
        "model": model,
        "lora_a": random_lora(model, root / "run" / "epoch1", seed=1, scale=1.0),
        "lora_b": random_lora(model, root / "lora_b", seed=2, scale=1.0),
        "root": root,
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infer_home")


@pytest.fixture(scope="module")
def service(home: Path):
    layout = DataLayout(home).ensure()
    db = Database(layout.db_path)
    svc = InferenceService(db, layout, None, Gallery(db, layout), idle_timeout_s=300)
    yield svc
    svc.shutdown()


def request(assets: dict[str, Path], **changes) -> InferRequest:
    values = dict(model="demo", prompt="a purple star spins", negative_prompt="blurry", width=32,
                  height=32, num_frames=5, steps=2, guidance_scale=4.0, flow_shift=3.0, seed=11, fps=8)
    values.update(changes)
    return InferRequest(**values)


def run(service: InferenceService, req: InferRequest, owner: str = "alice") -> dict:
    request_id = service.submit(req, owner)
    status = service.wait(request_id, WAIT_S)
    assert status["state"] in TERMINAL_STATES, f"request still {status['state']} after {WAIT_S}s"
    return status


def succeeded(service: InferenceService, req: InferRequest) -> dict:
    status = run(service, req)
    assert status["state"] == "succeeded", status["error"]
    return status


def digest(service: InferenceService, status: dict) -> str:
    return service.gallery.get(status["gallery_ids"][0]).digest


def test_video_is_browser_mp4_with_requested_shape_and_full_record(service, assets) -> None:
    status = succeeded(service, request(assets, num_videos=2, seed=5, width=64, height=48, num_frames=9, steps=2))
    assert len(status["gallery_ids"]) == 2
    assert status["worker"].endswith(" on cpu")  # the card that made it (the GPU suite sees cuda)
    assert status["step"] == status["total_steps"] == 4
    items = [service.gallery.get(i) for i in status["gallery_ids"]]
    assert [item.seed for item in items] == [5, 6]  # one seed per video, recorded
    item = items[0]
    info = probe_video(item.video_path)
    assert read_video(item.video_path).shape == (9, 48, 64, 3) and info.frames == 9
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert item.poster_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert item.meta_path.is_file() and item.dir.parent == service.layout.gallery_dir / "alice"
    assert item.owner == "alice" and item.prompt == "a purple star spins" and item.params["negative_prompt"] == "blurry"
    assert item.params["steps"] == 2 and item.params["guidance_scale"] == 4.0 and item.params["flow_shift"] == 3.0
    for key in ("load_s", "text_encode_s", "denoise_s", "decode_s", "encode_s"):
        assert item.timings[key] >= 0.0 and key in status["timings"]
    assert item.timings["denoise_s"] > 0 and item.timings["decode_s"] > 0 and item.timings["encode_s"] > 0


def test_empty_seed_and_flow_shift_are_filled_in_and_recorded(service, assets) -> None:
    status = succeeded(service, request(assets, seed=None, flow_shift=None))
    item = service.gallery.get(status["gallery_ids"][0])
    assert isinstance(status["seed"], int) and item.seed == status["seed"] == item.params["seed"]
    assert item.params["flow_shift"] == 2.0  # the demo model's scheduler config


def test_same_seed_reproduces_frames_and_other_seed_differs(service, assets) -> None:
    first, again = succeeded(service, request(assets)), succeeded(service, request(assets))
    other = succeeded(service, request(assets, seed=12))
    assert digest(service, first) == digest(service, again) != digest(service, other)
    video_a = read_video(service.gallery.get(first["gallery_ids"][0]).video_path)
    video_b = read_video(service.gallery.get(again["gallery_ids"][0]).video_path)
    assert np.array_equal(video_a, video_b)


def test_second_request_on_a_model_skips_loading(service, assets) -> None:
    other_model = build_random_wan(assets["root"] / "tiny_other", preset="tiny", seed=3)
    first = succeeded(service, request(assets, model=str(other_model), num_frames=5, steps=2))
    second = succeeded(service, request(assets, model=str(other_model), num_frames=5, steps=2, seed=3))
    assert first["timings"]["load_s"] > 0.0
    assert second["timings"]["load_s"] == 0.0


def test_lora_changes_output_and_weight_zero_equals_no_lora(service, assets) -> None:
    base = digest(service, succeeded(service, request(assets)))
    with_lora = succeeded(service, request(assets, loras=[LoraSpec(str(assets["lora_a"]), 1.0)]))
    zero = succeeded(service, request(assets, loras=[LoraSpec(str(assets["lora_a"]), 0.0)]))
    assert digest(service, with_lora) != base
    assert digest(service, zero) == base
    # LoRAs referenced by run folder resolve to the newest epoch's file, and weight is recorded.
    by_run = succeeded(service, request(assets, loras=[LoraSpec(str(assets["lora_a"].parent.parent), 1.0)]))
    assert digest(service, by_run) == digest(service, with_lora)
    item = service.gallery.get(with_lora["gallery_ids"][0])
    assert item.loras == [{"path": str(assets["lora_a"]), "name": "run/epoch1", "weight": 1.0}]
    assert after_disable_is_base(service, assets, base)


def after_disable_is_base(service, assets, base: str) -> bool:
    """A request without LoRAs after LoRA requests on the same warm pipeline is the plain model again."""
    return digest(service, succeeded(service, request(assets))) == base


def test_two_loras_mix_by_weight(service, assets) -> None:
    a, b = str(assets["lora_a"]), str(assets["lora_b"])
    only_a = digest(service, succeeded(service, request(assets, loras=[LoraSpec(a, 1.0)])))
    only_b = digest(service, succeeded(service, request(assets, loras=[LoraSpec(b, 1.0)])))
    mixed = digest(service, succeeded(service, request(assets, loras=[LoraSpec(a, 1.0), LoraSpec(b, 1.0)])))
    a_plus_zero_b = digest(service, succeeded(service, request(assets, loras=[LoraSpec(a, 1.0), LoraSpec(b, 0.0)])))
    assert len({only_a, only_b, mixed}) == 3
    assert a_plus_zero_b == only_a


ORIGINAL_WAN_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                      "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                      "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                      "ffn.net.2": "ffn.2"}


def test_lora_with_original_wan_module_names_gives_the_same_video(service, assets, tmp_path: Path) -> None:
    # ComfyUI / musubi LoRAs name modules as Wan's own code does (self_attn.q, ffn.0).
    from safetensors.torch import load_file, save_file

    renamed = {}
    for key, value in load_file(str(assets["lora_a"])).items():
        for ours, theirs in ORIGINAL_WAN_NAMES.items():
            key = key.replace(f".{ours}.lora_", f".{theirs}.lora_")
        renamed[key] = value
    assert any(".self_attn.q." in key for key in renamed)
    comfy_file = tmp_path / "comfy_named.safetensors"
    save_file(renamed, str(comfy_file))
    ours = succeeded(service, request(assets, loras=[LoraSpec(str(assets["lora_a"]), 0.9)]))
    theirs = succeeded(service, request(assets, loras=[LoraSpec(str(comfy_file), 0.9)]))
    assert digest(service, theirs) == digest(service, ours)


def test_fused_loras_match_unfused(service, assets) -> None:
    stack = [LoraSpec(str(assets["lora_a"]), 0.7), LoraSpec(str(assets["lora_b"]), -0.5)]
    plain = succeeded(service, request(assets, loras=stack))
    fused = succeeded(service, request(assets, loras=stack, fuse_loras=True))
    base = succeeded(service, request(assets))
    plain_f, fused_f, base_f = (read_video(service.gallery.get(s["gallery_ids"][0]).video_path).astype(int)
                                for s in (plain, fused, base))
    lora_effect = np.abs(plain_f - base_f).mean()
    # Merged weights differ from the unmerged sum only by float rounding (grown a little by the sampler).
    assert np.abs(fused_f - plain_f).mean() < 0.25 * lora_effect


def test_bad_lora_files_fail_before_queueing(service, assets, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(assets["lora_a"].read_bytes()[:300])
    with pytest.raises(ConfigError) as err:
        service.submit(request(assets, loras=[LoraSpec(str(truncated), 1.0)]), "alice")
    assert err.value.paths == ["loras[0].path"] and "truncated.safetensors" in str(err.value)
    flux = tmp_path / "flux_style.safetensors"
    from safetensors.torch import save_file

    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(8, 4)}, str(flux))
    with pytest.raises(ConfigError, match="flux"):
        service.submit(request(assets, loras=[LoraSpec(str(flux), 1.0)]), "alice")
    with pytest.raises(ConfigError, match="width"):
        service.submit(request(assets, width=50), "alice")
    with pytest.raises(ConfigError) as err:
        service.submit(request(assets, model=str(tmp_path / "nowhere"), num_frames=6), "alice")
    assert err.value.paths == ["model", "num_frames"]  # every problem at once


def test_lora_that_does_not_fit_fails_that_request_only(service, assets, tmp_path: Path) -> None:
    # A Wan LoRA with the right block names but another width passes the header check and fails
    # inside the worker; the warm worker must then serve the next request without reloading.
    wrong = save_lora({"blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 99),
                       "blocks.0.attn1.to_q.lora_B.weight": torch.ones(99, 4)},
                      tmp_path / "wrong", rank=4, alpha=4, target_modules=["to_q"], dtype=torch.float32)
    wrong_file = wrong / "adapter_model.safetensors"
    succeeded(service, request(assets, num_frames=5, steps=2))  # the model is warm
    failed = run(service, request(assets, loras=[LoraSpec(str(wrong_file), 1.0)]))
    assert failed["state"] == "failed" and failed["error_kind"] == "lora"
    assert str(wrong_file) in failed["error"] and failed["gallery_ids"] == []
    after = succeeded(service, request(assets, loras=[LoraSpec(str(assets["lora_a"]), 1.0)]))
    assert after["timings"]["load_s"] == 0.0  # same warm worker, no reload


def test_cancel_stops_running_and_queued_requests(service, assets) -> None:
    long_id = service.submit(request(assets, steps=200, num_videos=8, num_frames=9), "alice")  # 1600 steps: never finishes first
    queued_id = service.submit(request(assets, num_frames=5, steps=2), "alice")
    deadline = time.monotonic() + WAIT_S
    while service.status(long_id)["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    running = service.status(long_id)
    assert running["state"] == "running" and running["eta_s"] > 0
    service.cancel(queued_id)
    assert service.status(queued_id)["state"] == "cancelled"
    service.cancel(long_id)
    status = service.wait(long_id, WAIT_S)
    assert status["state"] == "cancelled" and status["step"] < 200 and status["gallery_ids"] == []
    assert not list((service.layout.gallery_dir / ".staging").glob(long_id + "*"))  # scratch files removed
    succeeded(service, request(assets, num_frames=5, steps=2))  # the worker serves on


def test_worker_killed_mid_request_fails_it_and_a_new_worker_serves_on(service, assets) -> None:
    import signal

    long_id = service.submit(request(assets, steps=200, num_videos=8, num_frames=9), "alice")
    deadline = time.monotonic() + WAIT_S
    while service.status(long_id)["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    (slot,) = service._slots
    slot.worker.process.send_signal(signal.SIGKILL)  # as the kernel's OOM killer would
    status = service.wait(long_id, WAIT_S)
    assert status["state"] == "failed" and status["error_kind"] == "crash" and "exited" in status["error"]
    after = succeeded(service, request(assets))
    assert after["timings"]["load_s"] > 0.0  # a fresh worker loaded the model again


def test_gallery_survives_a_restart(service, assets, home: Path) -> None:
    status = succeeded(service, request(assets, prompt="kept across restarts", num_frames=5, steps=2))
    layout = DataLayout(home)
    db = Database(layout.db_path)  # a fresh app: new connection, new gallery, new service
    gallery = Gallery(db, layout)
    restarted = InferenceService(db, layout, None, gallery, idle_timeout_s=60)
    try:
        items, total = gallery.list(query="kept across")
        assert total == 1 and items[0].id == status["gallery_ids"][0]
        assert items[0].video_path.is_file() and items[0].seed == 11
        assert restarted.gallery.get(items[0].id).timings == items[0].timings
    finally:
        restarted.shutdown()
        db.close()


def test_generation_waits_for_a_device_the_scheduler_hands_out(assets, tmp_path: Path) -> None:
    from engine.gpus import GpuInventory
    from engine.scheduler import Scheduler

    layout = DataLayout(tmp_path / "home").ensure()
    db = Database(layout.db_path)
    scheduler = Scheduler(db, layout, GpuInventory(), cpu_slots=1)
    assert scheduler.acquire_devices("training-job", 1) == [-1]  # a trainer holds the only slot
    svc = InferenceService(db, layout, scheduler, Gallery(db, layout), idle_timeout_s=3)
    try:
        request_id = svc.submit(request(assets), "alice")
        deadline = time.monotonic() + 30
        while svc.status(request_id)["state"] != "waiting" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        assert svc.status(request_id)["state"] == "waiting"  # never placed on the held slot
        scheduler.release_devices("training-job")
        assert svc.wait(request_id, WAIT_S)["state"] == "succeeded"
        assert scheduler.acquire_devices("second-trainer", 1) is None  # the warm worker holds the slot
        deadline = time.monotonic() + 60  # the idle worker stops and gives the slot back
        while scheduler.acquire_devices("second-trainer", 1) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert scheduler.acquire_devices("second-trainer", 1) == [-1]
    finally:
        svc.shutdown()
        db.close()
