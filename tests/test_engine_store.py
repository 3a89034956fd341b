"""The jobs tables: migrations, compare-and-set transitions, device/port claims, list pages."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.jobs import Job, JobStatus
from engine.store.db import Database
from engine.store.jobs import MIGRATIONS, JobStore


def new_job(store: JobStore, **values) -> Job:
    values.setdefault("status", JobStatus.QUEUED)
    return store.insert(kind="train", name="run", owner=values.pop("owner", "alice"), **values)


def test_schema_is_versioned_and_records_survive_reopen(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "s.db"))
    job = new_job(store, config_toml="x = 1\n", gpus_requested="0,3", gpus_explicit=True)
    reopened = JobStore(Database(tmp_path / "s.db"))  # a restart: migrations are not re-applied
    with reopened.db.read() as conn:
        version = conn.execute("SELECT version FROM schema_versions WHERE component = 'jobs'").fetchone()[0]
    assert version == len(MIGRATIONS)
    loaded = reopened.get(job.id)
    assert loaded == job
    assert loaded.requested_indices == [0, 3] and loaded.requested_count == 2
    assert reopened.get(job.id + 1) is None


def test_transition_is_compare_and_set_and_logs_an_event(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "s.db"))
    job = new_job(store)
    assert store.transition(job.id, [JobStatus.QUEUED], JobStatus.STOPPED, event="cancelled", ended_at=5.0)
    assert not store.transition(job.id, [JobStatus.QUEUED], JobStatus.STARTING)  # lost the race
    assert store.get(job.id).status == JobStatus.STOPPED and store.get(job.id).ended_at == 5.0
    assert [(e.kind, e.message) for e in store.events(job.id)] == [("created", "status queued"),
                                                                 ("stopped", "cancelled")]


def test_claims_and_holds_never_share_a_device_or_port(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "s.db"))
    a, b, c = new_job(store), new_job(store), new_job(store)
    assert store.claim(a.id, [0, 1], 29500)
    assert store.get(a.id).status == JobStatus.STARTING and store.get(a.id).gpus_assigned == [0, 1]
    assert not store.claim(b.id, [1], 29501)  # GPU 1 belongs to job a
    assert not store.claim(b.id, [2], 29500)  # so does the port
    assert not store.hold_devices("worker", [1], pid=1, pid_start_time=None)
    assert store.hold_devices("worker", [2, 3], pid=1, pid_start_time=None)
    assert not store.hold_devices("other", [3], pid=1, pid_start_time=None)
    assert not store.claim(b.id, [3], 29502)  # held by the inference worker
    assert store.devices_in_use() == {0, 1, 2, 3} and store.ports_in_use() == {29500}
    assert store.release_holds("worker") == 2
    assert store.claim(b.id, [2, 3], 29502)
    store.transition(a.id, [JobStatus.STARTING], JobStatus.SUCCEEDED)  # ended: devices free again
    assert store.devices_in_use() == {2, 3} and store.claim(c.id, [0], 29500)


def test_list_pages_filters_and_queue_order(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "s.db"))
    ids = [new_job(store, owner="alice" if i % 2 else "bob", priority=1 if i == 3 else 0).id for i in range(6)]
    store.transition(ids[0], [JobStatus.QUEUED], JobStatus.FAILED)
    assert [j.id for j in store.list(limit=2)] == [ids[5], ids[4]]
    assert [j.id for j in store.list(limit=2, offset=2)] == [ids[3], ids[2]]
    assert [j.id for j in store.list(owner="alice")] == [ids[5], ids[3], ids[1]]
    assert [j.id for j in store.list(statuses=[JobStatus.FAILED])] == [ids[0]]
    assert store.list(statuses=[]) == []
    assert store.count(owner="bob") == 3 and store.count(statuses=["queued"]) == 5
    assert [j.id for j in store.queued()] == [ids[3], ids[1], ids[2], ids[4], ids[5]]
    with pytest.raises(ValueError):
        store.list(statuses=["exploded"])


def test_status_enum() -> None:
    assert JobStatus.LOST.is_terminal and not JobStatus.STOPPING.is_terminal
    assert JobStatus.STOPPING.is_active and not JobStatus.QUEUED.is_active
    assert str(JobStatus.RUNNING) == "running"
