"""Helpers for the UI/API/browser tests (no tests here): a real `python app.py` with accounts,
a tiny dataset under the studio's dataset root, and a training TOML that runs in seconds on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.auth import UsersFile

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "root": "root-password"}


@dataclass
class StudioServer:
    url: str
    home: Path
    process: subprocess.Popen
    log: Path
    model: str
    dataset: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def base_model(root: Path) -> str:
    """A tiny random Wan built here: seconds per training run on a CPU (the demo model takes minutes)."""
    from engine.families.wan_random import build_random_wan

    return str(build_random_wan(root / "tiny_wan", preset="tiny", seed=0))


def write_dataset(home: Path, count: int = 4) -> Path:
    from engine.demo.world import sample_specs, write_dataset as write

    folder = home / "datasets" / "shapes"
    write(folder, sample_specs(count, seed=3))
    return folder


def train_toml(model: str, dataset: Path, epochs: int = 2, *, frame_buckets: str = "[1, 17]", head: str = "",
               tail: str = "") -> str:
    """A small LoRA run of `model` on 64-pixel clips; `head` adds top-level keys, `tail` whole tables."""
    return f"""output_dir = "ignored"
epochs = {epochs}
{head}save_every_n_epochs = 1
warmup_steps = 0
[model]
ckpt_path = "{model}"
dtype = "float32"
[adapter]
rank = 4
[optimizer]
lr = 1e-3
[dataset]
resolutions = [64]
frame_buckets = {frame_buckets}
[[dataset.directory]]
path = "{dataset}"
num_repeats = 1
{tail}"""


def start_server(root: Path, port: int, *, auth: bool = True, extra_env: dict[str, str] | None = None) -> StudioServer:
    """A studio on `root/home`; a second call on the same root restarts it on the same data."""
    home = root / "home"
    fresh = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    model = base_model(root) if fresh else str(root / "tiny_wan")
    dataset = write_dataset(home) if fresh else home / "datasets" / "shapes"
    args = [sys.executable, "app.py", "--port", str(port), "--home", str(home)]
    if auth:
        users = UsersFile(root / "users.toml")
        if fresh:
            users.add("alice", PASSWORDS["alice"])
            users.add("bob", PASSWORDS["bob"])
            users.add("root", PASSWORDS["root"], admin=True)
        args += ["--auth-file", str(users.path)]
    log = root / "app.out"
    env = {**os.environ, "STUDIO_HOME": str(home), **(extra_env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = StudioServer(f"http://127.0.0.1:{port}/", home, proc, log, model, dataset)

    def up() -> bool:
        assert proc.poll() is None, server.output()
        try:
            return urllib.request.urlopen(server.url, timeout=5).status == 200
        except OSError:
            return False

    wait_for(up, 180, "the studio to serve its page", interval=0.25)
    return server


def stop_app(server: StudioServer) -> None:
    """Stop the app process only (trainers keep running, as after a crash or an upgrade)."""
    server.process.terminate()
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()


def stop_server(server: StudioServer) -> None:
    stop_app(server)
    # Trainers outlive the app by design; end the ones this server started.
    from engine.store.db import Database
    from engine.store.jobs import JobStore

    db = Database(server.home / "studio.db")
    for job in JobStore(db).list(limit=500):
        if job.pid and job.status.is_active:
            try:
                os.killpg(job.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
    db.close()


def call_ui_event(url: str, user: str, elem_id: str, data: list[Any], event: str = "click") -> dict:
    """Fire the event behind a page element as a raw HTTP client would (login, queue/join, SSE);
    returns the final queue message ({'success': bool, 'output': ...})."""
    import json
    import uuid

    import httpx

    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/login", data={"username": user, "password": PASSWORDS[user]}).status_code == 200
        config = http.get("/config").json()
        target = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
        dep = next(d for d in config["dependencies"] if [target, event] in d["targets"])
        session = uuid.uuid4().hex[:12]
        joined = http.post("/gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": dep["id"],
                                                           "trigger_id": target, "session_hash": session})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
    raise AssertionError(f"no result for the {event} event of #{elem_id}")
