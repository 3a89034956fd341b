"""UI benchmark: app start to first served page, and the latency of the polling reads the tabs make
every second with 10 jobs running and 1,000 in history. Prints one JSON line.

Usage: python bench/ui.py [--history 1000] [--running 10] [--repeats 50]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_first_page(home: Path) -> float:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--home", str(home)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "STUDIO_HOME": str(home)})
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the app exited before serving")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200:
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def populate(ctx, history: int, running: int) -> list[int]:
    from engine.jobs import JobStatus
    from engine.store.jobs import JobStore

    store = JobStore(ctx.db)
    now = time.time()
    for i in range(history):
        store.insert(kind="train", name=f"old-{i}", owner="alice" if i % 2 else "bob",
                     status=JobStatus.SUCCEEDED, created_at=now - 86400 + i, step=100, total_steps=100)
    ids = []
    for i in range(running):
        run_dir = ctx.layout.runs_dir / f"live-{i}"
        run_dir.mkdir(parents=True)
        with (run_dir / "metrics.jsonl").open("w") as out:
            for step in range(1, 5001):
                out.write(json.dumps({"event": "step", "time": now, "step": step, "total_steps": 10000,
                                      "epoch": 1 + step // 1000, "loss": 1 / step, "lr": 1e-4}) + "\n")
        (run_dir / "train.log").write_text("step line\n" * 2000)
        job = store.insert(kind="train", name=f"live-{i}", owner="alice", status=JobStatus.RUNNING,
                           run_dir=str(run_dir), log_path=str(run_dir / "train.log"), step=5000, total_steps=10000)
        ids.append(job.id)
    return ids


def poll_latency(history: int, running: int, repeats: int) -> dict[str, float]:
    from studio.api import StudioApi
    from studio.auth import User
    from studio.context import StudioContext
    from studio.plots import loss_figure
    from studio.settings import StudioSettings

    home = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    ctx = StudioContext.create(StudioSettings(home=home).validate(), start=False)
    api = StudioApi(ctx)
    ids = populate(ctx, history, running)
    alice = User("alice")

    def one_tick() -> None:
        # What the Train tab's timer reads per second for one open page.
        api.list_jobs(alice, limit=50)
        job = ids[0]
        api.job_status(alice, job)
        loss_figure(api.job_metrics(alice, job), "x").to_json()
        api.job_log(alice, job)
        api.job_lora_files(alice, job)

    one_tick()  # first read of a run parses its whole metrics file once
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        one_tick()
        samples.append((time.perf_counter() - started) * 1000)
    gpu = []
    for _ in range(repeats):
        started = time.perf_counter()
        ctx.machine_status()
        gpu.append((time.perf_counter() - started) * 1000)
    ctx.close()
    samples.sort()
    return {"train_tick_ms_median": round(statistics.median(samples), 2),
            "train_tick_ms_p95": round(samples[int(0.95 * (len(samples) - 1))], 2),
            "gpus_tick_ms_median": round(statistics.median(gpu), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--running", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    first_page = time_to_first_page(Path(tempfile.mkdtemp(prefix="bench-ui-start-")))
    result = {"bench": "ui", "start_to_first_page_s": round(first_page, 2), "history_jobs": args.history,
              "running_jobs": args.running, **poll_latency(args.history, args.running, args.repeats)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
