"""Through the HTTP API with gradio_client: train a LoRA, generate with it, find it in the gallery;
and the account rules (wrong password, other users' jobs and videos)."""
from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client

from tests.conftest import free_port
from tests.ui_support import PASSWORDS, call_ui_event, start_server, stop_app, stop_server, train_toml, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("api")
    srv = start_server(root, free_port())
    srv.root = root
    yield srv
    stop_server(srv)


def client(server, user: str) -> Client:
    return Client(server.url, auth=(user, PASSWORDS[user]), verbose=False)


def test_train_generate_and_find_in_gallery(server) -> None:
    """The demo LoRA: the embedded `demo` model on the purple-star dataset the studio prepares."""
    alice = client(server, "alice")
    assert alice.predict(api_name="/whoami") == {"name": "alice", "admin": False}
    purple_star = server.home / "datasets" / "demo_purple_star"
    assert len(list(purple_star.glob("*.mp4"))) >= 8, "the studio prepares the demo dataset at start"
    # 5-frame clips: caching 17-frame ones would be most of the run, and nothing here looks at motion.
    job = alice.predict(train_toml("demo", purple_star, frame_buckets="[5]"), "", 1, "api-run",
                        api_name="/start_training")
    assert job["owner"] == "alice" and job["status"] == "queued"

    def finished():
        status = alice.predict(job["id"], api_name="/job_status")
        return status if status["terminal"] else None

    done = wait_for(finished, 420, "the training job to finish", interval=0.5)
    assert done["status"] == "succeeded", (done, alice.predict(job["id"], api_name="/job_log"), server.output())
    assert "epoch2" in done["loras"]
    series = alice.predict(job["id"], 2000, api_name="/job_metrics")
    assert len(series["step"]) >= 2 and len(series["loss"]) == len(series["step"])
    assert [j["id"] for j in alice.predict("succeeded", 50, 0, api_name="/list_jobs")] == [job["id"]]

    lora = f"job:{job['id']}/epoch2"
    started = alice.predict("a purple star moving right on a white background", "demo",
                            [{"lora": lora, "weight": 0.8}], "", 64, 48, 9, 3, 4.0, 3.0, 7, 8, 1, False,
                            api_name="/generate")

    def generated():
        status = alice.predict(started["request_id"], api_name="/generation_status")
        return status if status["state"] in {"succeeded", "failed", "cancelled"} else None

    result = wait_for(generated, 300, "the generation", interval=0.5)
    assert result["state"] == "succeeded", (result, server.output())
    item_id = result["gallery_ids"][0]
    listing = alice.predict("purple star", "", "", False, 1, 24, api_name="/gallery_list")
    assert item_id in [i["id"] for i in listing["items"]]
    item = alice.predict(item_id, api_name="/gallery_item")
    assert item["seed"] == 7 and (item["width"], item["height"], item["num_frames"]) == (64, 48, 9)
    assert [(l["weight"], l["name"].endswith("epoch2")) for l in item["loras"]] == [(0.8, True)]
    assert alice.predict(item_id, True, api_name="/gallery_favorite")["favorite"] is True

    # bob sees neither the run, its LoRA nor the video
    bob = client(server, "bob")
    assert bob.predict("", 50, 0, api_name="/list_jobs") == []
    assert bob.predict("", "", "", False, 1, 24, api_name="/gallery_list")["items"] == []
    for call in ((item_id, "/gallery_item"), (item_id, "/gallery_delete")):
        with pytest.raises(Exception, match="not found"):
            bob.predict(call[0], api_name=call[1])
    with pytest.raises(Exception, match="not found"):
        bob.predict("a star", "demo", [{"lora": lora, "weight": 1.0}], api_name="/generate")
    with pytest.raises(Exception, match="not found"):
        bob.predict(started["request_id"], api_name="/generation_status")
    assert alice.predict(item_id, api_name="/gallery_item")["id"] == item_id



def test_compare_every_save_of_the_run_and_the_base_model(server) -> None:
    """/compare over the trained run's saves ('job:ID/*') and 'none': one comparison, a video per row,
    each in the gallery with the comparison's id; bob sees nothing of it."""
    alice = client(server, "alice")
    job = next(j for j in alice.predict("succeeded", 50, 0, api_name="/list_jobs") if j["name"] == "api-run")
    queued = alice.predict(prompt="a purple star moving right on a white background",
                           compare_loras=[f"job:{job['id']}/*", "none"], weights=[], seeds=[], model="demo",
                           width=64, height=48, num_frames=9, steps=3, seed=5, api_name="/compare")
    assert queued["rows"] == [f"#{job['id']} epoch1", f"#{job['id']} epoch2", "no LoRA"]

    def compared():
        status = alice.predict(queued["compare_id"], api_name="/compare_status")
        return status if status["state"] not in ("queued", "running") else None

    done = wait_for(compared, 300, "the comparison", interval=0.5)
    assert done["state"] == "succeeded", (done, server.output())
    items = [alice.predict(c["gallery_ids"][0], api_name="/gallery_item") for c in done["cells"]]
    assert {i["params"]["compare_id"] for i in items} == {queued["compare_id"]} and {i["seed"] for i in items} == {5}
    assert [len(i["loras"]) for i in items] == [1, 1, 0]
    with pytest.raises(Exception, match="not found"):
        client(server, "bob").predict(queued["compare_id"], api_name="/compare_status")

def test_wrong_password_refused(server) -> None:
    with pytest.raises(ValueError, match="Could not login"):
        Client(server.url, auth=("alice", "not-her-password"), verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server.url, auth=("mallory", "whatever-pass"), verbose=False)


def test_one_user_cannot_see_or_stop_another_users_job(server) -> None:
    alice, bob, root = client(server, "alice"), client(server, "bob"), client(server, "root")
    job = alice.predict(train_toml(server.model, server.dataset, epochs=50), "", 1, "long-run",
                        api_name="/start_training")
    try:
        assert job["id"] not in [j["id"] for j in bob.predict("", 50, 0, api_name="/list_jobs")]
        for endpoint in ("/job_status", "/stop_job", "/cancel_job", "/save_job", "/job_log", "/job_metrics"):
            with pytest.raises(Exception, match=f"job {job['id']} not found"):
                bob.predict(job["id"], api_name=endpoint)
        status = alice.predict(job["id"], api_name="/job_status")["status"]
        assert status in {"queued", "starting", "running"}  # bob's calls changed nothing
        for bad in (job["id"] + 0.5, 10**20, "abc"):  # never read as another job, never a traceback
            with pytest.raises(Exception, match="job id must be"):
                alice.predict(bad, api_name="/stop_job")
        assert alice.predict(job["id"], api_name="/job_status")["status"] == status
        assert job["id"] in [j["id"] for j in root.predict("", 50, 0, api_name="/list_jobs")]  # admin sees all
        # a dataset outside the allowed roots is refused before anything runs
        outside = train_toml(server.model, Path("/etc"))
        with pytest.raises(Exception, match="outside the allowed dataset folders"):
            bob.predict(outside, "", 1, "", api_name="/start_training")
    finally:
        final = root.predict(job["id"], api_name="/stop_job")  # the admin may stop anyone's job
        assert final["status"] in {"stopping", "stopped", "cancelled", "succeeded", "failed"} or final["terminal"]
    wait_for(lambda: alice.predict(job["id"], api_name="/job_status")["terminal"], 120, "the stopped job to end")


def test_hidden_ui_events_check_the_user_too(server) -> None:
    """Page events are HTTP endpoints as well: bob fires them by hand against alice's job and /etc."""
    alice = client(server, "alice")
    job = alice.predict("", 50, 0, api_name="/list_jobs")[0]
    stop = call_ui_event(server.url, "bob", "job-stop", [job["id"]])
    assert stop["success"] is False
    assert alice.predict(job["id"], api_name="/job_status")["status"] == job["status"]
    check = call_ui_event(server.url, "bob", "train-check", ["/etc", "1, 17"])
    assert check["success"] is False and "outside the allowed dataset folders" in check["output"]["error"]
    own = call_ui_event(server.url, "alice", "train-check", [str(server.dataset), "1, 17"])
    assert own["success"] is True and "4 files in shapes" in own["output"]["data"][0]


def test_app_restart_loses_nothing(server) -> None:
    before = client(server, "alice")
    jobs = before.predict("", 50, 0, api_name="/list_jobs")
    videos = before.predict("", "", "", False, 1, 24, api_name="/gallery_list")
    assert jobs and videos["items"]
    stop_app(server)
    restarted = start_server(server.root, free_port())
    server.process, server.url = restarted.process, restarted.url  # the fixture stops the new one
    after = client(server, "alice")
    assert [(j["id"], j["status"]) for j in after.predict("", 50, 0, api_name="/list_jobs")] == \
        [(j["id"], j["status"]) for j in jobs]
    assert after.predict("", "", "", False, 1, 24, api_name="/gallery_list")["items"] == videos["items"]
