"""Two users on one studio (issue 16): every endpoint and every file URL of alice's objects, with
names guessed from the patterns (runs/<user>/<id>-<slug>/..., gallery/<user>/<id>/...), answers "not found" or
403 to bob; alice's uploaded dataset is outside bob's roots; no error names the data directory.
The file trees themselves are not served to anyone: files reach the browser through expiring links."""
from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from studio.files import FileLinks, redact_home, serve_links_in_place
from tests.conftest import free_port
from tests.ui_support import PASSWORDS, start_server, stop_server, train_toml, wait_for

pytestmark = pytest.mark.slow  # a real app, one generation: about 40 s


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("isolation"), free_port())
    yield srv
    stop_server(srv)


def client(server, user: str) -> Client:
    return Client(server.url, auth=(user, PASSWORDS[user]), verbose=False)


def fetch_as(server, user: str, path: Path) -> int:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/login", data={"username": user, "password": PASSWORDS[user]}).status_code == 200
        return http.get(f"/gradio_api/file={path}").status_code


def alice_objects(server) -> dict:
    from engine.demo.world import sample_specs, write_dataset

    alice = client(server, "alice")
    private = server.home / "uploads" / "alice" / "datasets" / "alice_private"
    write_dataset(private, sample_specs(2, seed=5))
    # The generation first: it takes the CPU slot at once, and the job (which nothing here needs running)
    # waits for it instead of the generation waiting for a whole training run.
    started = alice.predict("a red circle moving right", "demo", [], "", 32, 32, 5, 2, 4.0, 3.0, 7, 8, 1, False,
                            api_name="/generate")
    job = alice.predict(train_toml(server.model, private), "", 1, "alice secret run", api_name="/start_training")

    def generated():
        status = alice.predict(started["request_id"], api_name="/generation_status")
        return status if status["state"] in {"succeeded", "failed", "cancelled", "lost"} else None

    result = wait_for(generated, 240, "alice's generation", interval=1)
    assert result["state"] == "succeeded", (result, server.output())
    run_dir = server.home / "runs" / "alice" / f"{job['id']}-alice-secret-run"  # the guessable pattern
    (run_dir / "epoch1").mkdir(parents=True, exist_ok=True)
    (run_dir / "epoch1" / "adapter_model.safetensors").write_bytes(b"secret weights")
    for name in ("train.log", "run.toml"):  # the job may still wait for the slot: its files as a launch writes them
        (run_dir / name).touch()
    return {"job": job["id"], "request": started["request_id"], "item": result["gallery_ids"][0],
            "run_dir": run_dir, "dataset": private}


def test_bob_reaches_none_of_alices_objects_by_endpoint_or_url(server) -> None:
    objects = alice_objects(server)
    bob = client(server, "bob")
    home = str(server.home)
    calls = [(api, (objects["job"],)) for api in ("/job_status", "/job_log", "/job_metrics", "/stop_job",
                                                  "/cancel_job", "/resume_job", "/save_job")]
    calls += [(api, (objects["request"],)) for api in ("/generation_status", "/cancel_generation")]
    calls += [(api, (objects["item"],)) for api in ("/gallery_item", "/gallery_delete")]
    calls += [("/gallery_favorite", (objects["item"], True))]
    for api_name, args in calls:
        with pytest.raises(Exception, match="not found") as refused:
            bob.predict(*args, api_name=api_name)
        assert home not in str(refused.value), api_name
    with pytest.raises(Exception, match="outside the allowed dataset folders") as refused:
        bob.predict(str(objects["dataset"]), "1,17", "", api_name="/check_dataset")
    assert home not in str(refused.value)
    with pytest.raises(Exception, match="outside the allowed dataset folders"):
        bob.predict(train_toml(server.model, objects["dataset"]), "", 1, "theft", api_name="/start_training")
    assert bob.predict(50, 0, api_name="/list_generations") == []
    assert [g["id"] for g in client(server, "alice").predict(50, 0, api_name="/list_generations")] == [objects["request"]]

    item_dir = server.home / "gallery" / "alice" / objects["item"]
    files = [objects["run_dir"] / "epoch1" / "adapter_model.safetensors", objects["run_dir"] / "train.log",
             objects["run_dir"] / "run.toml", item_dir / "video.mp4", item_dir / "poster.png",
             item_dir / "meta.json", server.home / "studio.db"]
    assert (item_dir / "video.mp4").is_file()
    for user in ("bob", "alice"):  # the trees are served to nobody, the owner included
        assert {str(f): fetch_as(server, user, f) for f in files} == {str(f): 403 for f in files}
    # Gradio's cache under names guessable without its secret seed (plain content hashes): nothing there
    from gradio import utils

    content = (item_dir / "video.mp4").read_bytes()
    cached = [Path(utils.get_cache_folder()) / hashlib.new(kind, content).hexdigest() / name
              for kind in ("sha256", "sha1") for name in ("video.mp4", "display.mp4")]
    assert {str(f): fetch_as(server, "bob", f) for f in cached} == {str(f): 403 for f in cached}


def test_links_expire_and_messages_hide_the_data_directory(tmp_path: Path) -> None:
    source = tmp_path / "home" / "gallery" / "item" / "video.mp4"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"video")
    links = FileLinks(tmp_path / "home" / "served", ttl_s=60)
    first = Path(links.link(source))
    assert first.read_bytes() == b"video" and first.parent.parent == links.root and len(first.parent.name) == 32
    assert Path(links.link(source)).parent != first.parent  # every link its own unguessable folder
    assert links.sweep(now=first.parent.stat().st_mtime + 61) == 2 and not first.exists()
    assert redact_home(f"cannot read {tmp_path / 'home'}/runs/1-x/run.toml", tmp_path / "home") == \
        "cannot read <studio data>/runs/1-x/run.toml"


def test_gradio_serves_links_in_place_so_no_cache_copy_outlives_them(tmp_path: Path) -> None:
    """A link a handler returns to a gr.Video is served where it lies: Gradio keeps no copy in its
    cache (whose URLs never expire), and once the link is swept the URL leads nowhere."""
    import gradio as gr
    from gradio import processing_utils, utils

    source = tmp_path / "home" / "gallery" / "item" / "video.mp4"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"alice's video " + bytes(range(256)))
    links = FileLinks(tmp_path / "home" / "served", ttl_s=5, sweep_every_s=0.2)
    serve_links_in_place(links.root)
    link = links.link(source)
    with gr.Blocks():
        shown = gr.File()  # gr.Video's value goes the same way (move_files_to_cache), after a format check
    served = processing_utils.move_files_to_cache(shown.postprocess(link).model_dump(), shown, postprocess=True)
    assert served["path"] == link and not Path(link).is_relative_to(utils.get_cache_folder())  # no cache copy
    wait_for(lambda: not Path(link).exists(), 10, "the sweeper to delete the expired link", interval=0.1)
    assert source.is_file()
