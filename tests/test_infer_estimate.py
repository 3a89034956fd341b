"""A generation's CPU time, estimated before it starts: a long one warns, a demo-sized one does not."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from engine.families.wan_random import TRANSFORMER_PRESETS
from engine.gallery import Gallery
from engine.inference.estimate import cpu_estimate, cpu_warning, long_request_warning
from engine.inference.request import InferRequest
from engine.inference.service import InferenceService
from engine.models import demo_model_dir
from engine.paths import DataLayout
from engine.planner_shapes import ModelShape
from engine.store.db import Database

WAN_1_3B = ModelShape.from_transformer_config({**TRANSFORMER_PRESETS["1.3B"], "in_channels": 16,
                                               "patch_size": [1, 2, 2]})


def demo_request(**changes) -> InferRequest:
    return InferRequest.from_dict({"model": "demo", "prompt": "a purple star", **changes})


def test_demo_request_is_estimated_near_its_measured_seconds_and_does_not_warn() -> None:
    shape = ModelShape.from_model_dir(demo_model_dir())
    estimate = cpu_estimate(shape, demo_request())  # 64x64x17, 20 steps, guidance 5: 4-7 s measured
    assert 3.0 <= estimate.seconds <= 7.0 and estimate.low_s < estimate.seconds < estimate.high_s
    assert cpu_warning(demo_model_dir(), demo_request()) is None


def test_wan_1_3b_at_480p81_warns_in_hours_and_guidance_doubles_the_forwards() -> None:
    req = InferRequest(model="x", prompt="p", width=832, height=480, num_frames=81, steps=30, guidance_scale=5.0)
    warning = long_request_warning(WAN_1_3B, req)
    assert warning is not None and " h " in warning and "CPU" in warning and "832x480x81" in warning
    with_cfg = cpu_estimate(WAN_1_3B, req).seconds
    without = cpu_estimate(WAN_1_3B, req.model_copy(update={"guidance_scale": 1.0})).seconds
    assert 1.8 < with_cfg / without <= 2.0  # the decode is paid once
    assert long_request_warning(WAN_1_3B, req.model_copy(update={"width": 128, "height": 128, "num_frames": 5,
                                                                   "steps": 2})) is None  # about 20 s
    assert " min " in long_request_warning(WAN_1_3B, req.model_copy(update={"width": 256, "height": 256,
                                                                              "num_frames": 17, "steps": 10}))


def test_cpu_service_status_carries_the_warning_of_a_long_request_only(tmp_path: Path) -> None:
    """A real service on CPU slots; a trainer holds the only slot, so nothing runs or spawns a worker."""
    from engine.gpus import GpuInventory
    from engine.scheduler import Scheduler

    layout = DataLayout(tmp_path / "home").ensure()
    db = Database(layout.db_path)
    scheduler = Scheduler(db, layout, GpuInventory(), cpu_slots=1)
    if scheduler.device_pool() != [-1]:
        pytest.skip("this machine has GPUs: requests do not run on CPU")
    assert scheduler.acquire_devices("training-job", 1) == [-1]
    svc = InferenceService(db, layout, scheduler, Gallery(db, layout), idle_timeout_s=3)
    try:
        tiny = svc.submit(demo_request(), "alice")
        long = svc.submit(demo_request(width=832, height=480, num_frames=81, steps=30), "alice")
        assert svc.status(tiny)["warning"] is None
        warning = svc.status(long)["warning"]
        assert warning and "estimated at about" in warning and ("minutes" in warning or " h " in warning)
        # A restart: this service's process is gone (another start time), a new one adopts the queued
        # request from the database alone and still has its warning.
        svc.requests.update(long, service_start_time=1.0)
        later = InferenceService(Database(layout.db_path), layout, scheduler, Gallery(db, layout), idle_timeout_s=3)
        try:
            assert later.status(long)["warning"] == warning and later.status(tiny)["warning"] is None
            assert later.list("alice")[0]["warning"] == warning
        finally:
            later.shutdown()
        for request_id in (tiny, long):
            svc.cancel(request_id)
        deadline = time.monotonic() + 10
        while svc.status(long)["state"] != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        svc.shutdown()
        db.close()


def test_api_status_and_infer_tab_notice_carry_the_warning(api) -> None:
    """Through the studio's API (as the HTTP API and the Infer tab use it); the only CPU slot is held."""
    from studio.auth import User
    from studio.mcp_server import build_server
    from tabs import infer

    if api.ctx.scheduler.device_pool() != [-1]:
        pytest.skip("this machine has GPUs: requests do not run on CPU")
    assert api.ctx.scheduler.acquire_devices("training-job", 1) == [-1]
    alice = User("alice")
    tiny_answer = api.generate(alice, {"model": "demo", "prompt": "a star"})
    long_answer = api.generate(alice, {"model": "demo", "prompt": "a star", "width": 832, "height": 480,
                                       "num_frames": 81, "steps": 30})
    tiny, long = tiny_answer["request_id"], long_answer["request_id"]
    assert tiny_answer["warning"] is None and "estimated at about" in long_answer["warning"]  # said at once
    assert api.generation_status(alice, tiny)["warning"] is None
    assert api.generation_status(alice, long)["warning"] == long_answer["warning"]
    assert "estimated" not in infer.queued_notice(tiny_answer) and "queued" in infer.queued_notice(tiny_answer)
    assert "runs on CPU and is estimated at about" in infer.queued_notice(long_answer)
    by_agent = asyncio.run(build_server(api, alice).call_tool("generate", {
        "prompt": "a star", "width": 832, "height": 480, "num_frames": 81, "steps": 30}))
    text = "".join(getattr(block, "text", "") for block in by_agent.content)  # what the agent reads
    assert json.loads(text)["warning"] == long_answer["warning"]
    for request_id in (tiny, long, json.loads(text)["request_id"]):
        api.cancel_generation(alice, request_id)
