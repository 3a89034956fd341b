"""Job engine speed: store reads with 10,000 jobs, metrics reads on a 100,000-step run.

    python bench/engine.py [--jobs 10000] [--steps 100000]

Prints one JSON line. Targets: a list page and one job read each under 20 ms; reading new
metrics costs time proportional to the new lines, not to the file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.jobs import JobStatus  # noqa: E402
from engine.metrics import LossSeries, MetricsReader  # noqa: E402
from engine.store.db import Database  # noqa: E402
from engine.store.jobs import JobStore  # noqa: E402

CONFIG = "\n".join(f'key_{i} = "{"x" * 40}"' for i in range(30))  # ~1.5 KB like a real config
STATUSES = [JobStatus.SUCCEEDED] * 7 + [JobStatus.FAILED, JobStatus.STOPPED, JobStatus.QUEUED]


def timed_ms(func, repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(samples), 3), "max_ms": round(max(samples), 3)}


def bench_store(folder: Path, jobs: int) -> dict:
    db = Database(folder / "studio.db")
    store = JobStore(db)
    start = time.perf_counter()
    with db.connect():  # one transaction: the fill is setup, not what we measure
        for i in range(jobs):
            store.insert(kind="train", name=f"run {i}", owner=f"user{i % 20}", status=STATUSES[i % len(STATUSES)],
                         config_toml=CONFIG, gpus_requested="1", step=i % 500, total_steps=500,
                         last_loss=0.05, log_tail="line\n" * 50 if i % 10 == 7 else None)
    fill_s = time.perf_counter() - start
    middle = jobs // 2
    return {
        "jobs": jobs,
        "fill_s": round(fill_s, 2),
        "list_page": timed_ms(lambda: store.list(limit=50), 50),
        "list_page_deep": timed_ms(lambda: store.list(limit=50, offset=jobs - 100), 20),
        "list_owner_page": timed_ms(lambda: store.list(owner="user7", limit=50), 50),
        "list_status_page": timed_ms(lambda: store.list(statuses=["failed", "queued"], limit=50), 50),
        "get_job": timed_ms(lambda: store.get(middle), 200),
        "queued_in_order": timed_ms(store.queued, 20),
        "active_jobs": timed_ms(store.active, 50),
    }


def write_steps(path: Path, first: int, count: int) -> None:
    with open(path, "a") as handle:
        for step in range(first, first + count):
            handle.write(json.dumps({"event": "step", "time": 1.7e9 + step, "step": step, "total_steps": 10**6,
                                     "epoch": 1 + step // 1000, "loss": 0.1 + (step % 97) / 1000, "lr": 1e-4,
                                     "grad_norm": 0.5, "samples_per_s": 2.0, "elapsed_s": step * 0.5,
                                     "eta_s": 1000.0}) + "\n")


def bench_metrics(folder: Path, steps: int) -> dict:
    run_dir = folder / "run"
    run_dir.mkdir()
    path = run_dir / "metrics.jsonl"
    write_steps(path, 1, steps)
    series = LossSeries(run_dir, max_points=2000)
    start = time.perf_counter()
    first = series.update()
    initial_ms = (time.perf_counter() - start) * 1000
    reader = MetricsReader(path)
    reader.skip_to_end()
    result = {"steps": steps, "file_mb": round(path.stat().st_size / 2**20, 1),
              "series_initial_ms": round(initial_ms, 1), "series_points": len(first["step"])}
    next_step = steps + 1
    for new_lines in (10, 1000):
        write_steps(path, next_step, new_lines)
        next_step += new_lines
        start = time.perf_counter()
        events = reader.read_new()
        read_ms = (time.perf_counter() - start) * 1000
        assert len(events) == new_lines
        start = time.perf_counter()
        out = series.update()
        update_ms = (time.perf_counter() - start) * 1000
        assert len(out["step"]) <= 2000 and out["step"][-1] == next_step - 1
        result[f"read_{new_lines}_new_ms"] = round(read_ms, 3)
        result[f"series_update_{new_lines}_new_ms"] = round(update_ms, 3)
    result["series_unchanged_ms"] = timed_ms(series.update, 50)["median_ms"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = bench_store(Path(tmp), args.jobs)
        metrics = bench_metrics(Path(tmp), args.steps)
    ok = (store["list_page"]["median_ms"] < 20 and store["get_job"]["median_ms"] < 20
          and metrics["read_10_new_ms"] < metrics["read_1000_new_ms"])
    print(json.dumps({"bench": "engine", "store": store, "metrics": metrics, "targets_met": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
