"""The running studio on two GPUs, through its HTTP API (gradio_client), as a user of the web app:
the demo LoRA trained on GPU 0 while a two-GPU job waits for it, /gpu_status read from the live
nvidia-smi showing who holds which GPU, and videos generated on a GPU with and without the LoRA
(frames saved to look at)."""
from __future__ import annotations

import pytest

from tests.gpu.support import gpus, needs_gpus, record, save_frames, wait_for

pytestmark = needs_gpus(2)

PROMPT = "a purple star moving right on a white background"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import free_port
    from tests.ui_support import start_server, stop_server

    srv = start_server(tmp_path_factory.mktemp("gpu-api"), free_port())
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def alice(server):
    from gradio_client import Client

    from tests.ui_support import PASSWORDS

    return Client(server.url, auth=("alice", PASSWORDS["alice"]), verbose=False)


def holders(alice) -> dict[int, str]:
    return {gpu["index"]: gpu["job"] for gpu in alice.predict(api_name="/gpu_status")["gpus"]}


def test_queue_waits_for_a_busy_gpu_and_gpu_status_shows_the_holder(server, alice) -> None:
    from engine.demo.setup import demo_lora_config_text
    from engine.gallery import Gallery
    from engine.paths import DataLayout
    from engine.store.db import Database
    from tests.ui_support import train_toml

    demo = alice.predict(demo_lora_config_text(server.home), "0", 1, "demo-lora-gpu0", api_name="/start_training")
    wait_for(lambda: (alice.predict(demo["id"], api_name="/job_status").get("step") or 0) >= 1, 300,
             "the demo LoRA's first step on GPU 0")
    wide = alice.predict(train_toml(server.model, server.dataset, epochs=100000), "", 2, "two-gpus",
                         api_name="/start_training")

    status = alice.predict(api_name="/gpu_status")
    smi = {g.index: g for g in gpus()}
    assert [g["index"] for g in status["gpus"]] == sorted(smi)
    assert all(g["name"] == smi[g["index"]].name for g in status["gpus"])
    held = holders(alice)
    assert held[0].startswith(f"#{demo['id']} ") and held[1] == "", status
    gpu0 = status["gpus"][0]
    assert gpu0["memory_used_mib"] > 0 and gpu0["memory_total_mib"] > 10_000, gpu0
    if alice.predict(demo["id"], api_name="/job_status")["status"] == "running":
        assert alice.predict(wide["id"], api_name="/job_status")["status"] == "queued"

    done = wait_for(lambda: (s := alice.predict(demo["id"], api_name="/job_status"))["terminal"] and s, 900,
                    "the demo LoRA to finish")
    assert done["status"] == "succeeded", (done, alice.predict(demo["id"], api_name="/job_log"))
    wait_for(lambda: alice.predict(wide["id"], api_name="/job_status")["status"] == "running", 120,
             "the two-GPU job to start once GPU 0 is free")
    wait_for(lambda: set(holders(alice).values()) == {holders(alice)[0]} and holders(alice)[0].startswith(
        f"#{wide['id']} "), 60, "both GPUs shown as held by the two-GPU job")
    stopped = alice.predict(wide["id"], api_name="/stop_job")
    assert stopped["status"] in {"stopping", "stopped"}
    final = wait_for(lambda: (s := alice.predict(wide["id"], api_name="/job_status"))["terminal"] and s, 300,
                     "the two-GPU job to stop")
    assert final["status"] == "stopped", final
    record("API: 2-GPU job waits for GPU 0, gpu_status holders", demo_job=demo["id"], wide_job=wide["id"],
           gpu0_memory_used_mib=gpu0["memory_used_mib"], demo_steps=done.get("step"))

    loras = [name for name in done["loras"] if name.startswith("epoch")]
    newest = max(loras, key=lambda name: int(name[5:]))
    gallery = Gallery(Database(DataLayout(server.home).db_path), DataLayout(server.home))
    for label, chosen in (("base", []), ("lora", [{"lora": f"job:{demo['id']}/{newest}", "weight": 1.0}])):
        started = alice.predict(PROMPT, "demo", chosen, "", 64, 64, 17, 20, 5.0, 3.0, 11, 16, 1, False,
                                api_name="/generate")
        result = wait_for(lambda: (s := alice.predict(started["request_id"], api_name="/generation_status"))[
            "state"] in {"succeeded", "failed", "cancelled"} and s, 600, f"the {label} video")
        assert result["state"] == "succeeded", (result, server.output())
        assert result["worker"].endswith(" on cuda"), result["worker"]
        item = gallery.get(result["gallery_ids"][0])
        frames = save_frames(item.video_path, f"demo-{label}-gpu")
        record(f"API: demo model on GPU, {label}", timings=result["timings"], frames=[p.name for p in frames])
