"""An image-to-video generation made again from the gallery (issue 19 follow-up): on a tiny random Wan2.1 I2V
model through the real service and worker, a video made from a start image keeps a copy of it; after the
upload is deleted, "Reuse in Infer" brings it back into the form, and Generate and Compare from that form
start from the same image (the same seed gives the same pixels); the API and MCP name it 'gallery:ID', the
CLI's `gallery show` names the file for `infer --image`."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from studio.api import StudioApi
from studio.auth import User
from tests.family_support import start_image

ALICE = User("alice")
FORM = {"prompt": "a green square", "negative_prompt": "", "width": 32, "height": 32, "num_frames": 1, "fps": 8,
        "steps": 2, "guidance_scale": 1.0, "flow_shift": 3.0, "seed": 1, "num_videos": 1, "fuse_loras": False}


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.families.wan_random import build_random_wan

    return build_random_wan(tmp_path_factory.mktemp("i2v") / "wan21_i2v", i2v="wan2.1")


def finished(api: StudioApi, request_id: str) -> dict:
    status = api.ctx.inference.wait(request_id, 240)
    assert status["state"] == "succeeded", status
    return api.gallery_item(ALICE, status["gallery_ids"][0])


@pytest.mark.slow
def test_reuse_and_compare_start_from_the_items_start_image(tmp_path: Path, api: StudioApi, i2v_model: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from studio.cli import main
    from tabs import compare, gallery, infer

    names = list(FORM) + ["model"]
    first_form = {**FORM, "model": str(i2v_model), "image": str(start_image(tmp_path / "start.png")), "loras": []}
    first = finished(api, api.generate(ALICE, infer.with_start_image(api, ALICE, first_form))["request_id"])
    for upload in (api.user_uploads(ALICE) / "images").iterdir():
        upload.unlink()  # the item keeps its own copy

    # The CLI's way: `gallery show` names the kept file for `infer --image`.
    assert main(["--home", str(api.ctx.layout.home), "gallery", "show", first["id"]]) == 0
    kept = Path(capsys.readouterr().out.split("start     ")[1].strip())
    assert kept.read_bytes() == (tmp_path / "start.png").read_bytes()

    reused = gallery.reuse_values(api, ALICE, first["id"], names)
    assert Path(reused.start_image).read_bytes() == (tmp_path / "start.png").read_bytes()
    form = {**dict(zip(names, reused.values)), "loras": reused.loras, "image": reused.start_image}
    again = finished(api, api.generate(ALICE, infer.with_start_image(api, ALICE, form))["request_id"])
    assert again["digest"] == first["digest"]  # same image, same seed: the same video

    compare_id, _ = compare.start_compare(api, ALICE, form, [], "", "1, 2")
    deadline = time.monotonic() + 240
    while (status := api.compare_status(ALICE, compare_id))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    cells = {c["column"]: c for c in status["cells"]}
    assert status["state"] == "succeeded", status
    images = {api.ctx.inference.status(c["request_id"])["request"]["image"] for c in cells.values()}
    assert len(images) == 1 and Path(images.pop()).read_bytes() == (tmp_path / "start.png").read_bytes()
    digests = {column: api.gallery_item(ALICE, c["gallery_ids"][0])["digest"] for column, c in cells.items()}
    assert digests["seed 1"] == first["digest"] != digests["seed 2"]

    # The API's and MCP's way: the item's params name its start image 'gallery:ID', which they take.
    assert first["params"]["image"] == f"gallery:{first['id']}"
    by_api = api.generate(ALICE, {**FORM, "model": str(i2v_model), "image": first["params"]["image"]})
    assert Path(api.ctx.inference.status(by_api["request_id"])["request"]["image"]).read_bytes() == \
        (tmp_path / "start.png").read_bytes()
    api.cancel_generation(ALICE, by_api["request_id"])
    from studio.mcp_server import build_server

    by_agent = asyncio.run(build_server(api, ALICE).call_tool("compare", {
        "prompt": "a green square", "model": str(i2v_model), "seeds": [3, 4], "image": f"gallery:{first['id']}"}))
    assert not by_agent.is_error, by_agent.content
    cells = by_agent.structured_content["cells"]
    images = {api.ctx.inference.status(c["request_id"])["request"]["image"] for c in cells}
    assert len(cells) == 2 and len(images) == 1 and Path(images.pop()).read_bytes() == \
        (tmp_path / "start.png").read_bytes()
    api.cancel_compare(ALICE, by_agent.structured_content["compare_id"])
