"""SQL of jobs, job events and device holds. Nothing outside this module writes these tables."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from engine.jobs import ACTIVE_STATUSES, Job, JobStatus
from engine.store.db import Database

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        config_toml TEXT NOT NULL DEFAULT '',
        gpus_requested TEXT NOT NULL DEFAULT '1',
        gpus_explicit INTEGER NOT NULL DEFAULT 0,
        gpus_assigned TEXT NOT NULL DEFAULT '',
        master_port INTEGER,
        pid INTEGER,
        pid_start_time REAL,
        run_dir TEXT,
        log_path TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        exit_code INTEGER,
        failure_reason TEXT,
        failure_hint TEXT,
        log_tail TEXT,
        priority INTEGER NOT NULL DEFAULT 0,
        queue_pos REAL NOT NULL DEFAULT 0,
        step INTEGER,
        total_steps INTEGER,
        last_loss REAL,
        eta_s REAL,
        phase TEXT,
        resume INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        stop_requested_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_status_order ON jobs(status, priority DESC, queue_pos, id);
    CREATE INDEX jobs_owner_id ON jobs(owner, id DESC);
    CREATE TABLE job_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX job_events_job ON job_events(job_id, id);
    CREATE TABLE device_holds (
        device INTEGER PRIMARY KEY,
        holder TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_start_time REAL,
        acquired_at REAL NOT NULL
    );
    """,
    # v2: status-filtered list pages (newest first) without a sort
    "CREATE INDEX jobs_status_id ON jobs(status, id DESC);",
]

_JOB_COLUMNS = [f.name for f in fields(Job)]
_ACTIVE = tuple(s.value for s in ACTIVE_STATUSES)


@dataclass(frozen=True)
class JobEvent:
    job_id: int
    time: float
    kind: str
    message: str


@dataclass(frozen=True)
class DeviceHold:
    device: int
    holder: str
    pid: int
    pid_start_time: float | None
    acquired_at: float


def _encode(name: str, value: Any) -> Any:
    if name == "gpus_assigned":
        return ",".join(str(d) for d in value)
    if name == "status":
        return JobStatus(value).value
    if isinstance(value, bool):
        return int(value)
    return value


def _row_to_job(row: sqlite3.Row) -> Job:
    data = {name: row[name] for name in _JOB_COLUMNS}
    data["status"] = JobStatus(data["status"])
    data["gpus_assigned"] = [int(x) for x in data["gpus_assigned"].split(",") if x]
    data["gpus_explicit"] = bool(data["gpus_explicit"])
    data["resume"] = bool(data["resume"])
    return Job(**data)


def _in_clause(values: Sequence[Any]) -> str:
    return ",".join("?" for _ in values)


class JobStore:
    """Jobs, their event history and the device holds of non-job users (inference workers)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("jobs", MIGRATIONS)

    # ---- jobs ----------------------------------------------------------------------------------
    def insert(self, **values: Any) -> Job:
        now = time.time()
        values.setdefault("created_at", now)
        values["updated_at"] = now
        with self.db.connect() as conn:
            if "queue_pos" not in values:
                row = conn.execute("SELECT COALESCE(MAX(queue_pos), 0) + 1 AS pos FROM jobs").fetchone()
                values["queue_pos"] = row["pos"]
            names = list(values)
            cursor = conn.execute(
                f"INSERT INTO jobs({', '.join(names)}) VALUES ({_in_clause(names)})",
                [_encode(n, values[n]) for n in names],
            )
            job_id = int(cursor.lastrowid)
            self._event(conn, job_id, "created", f"status {values.get('status', '')}")
            return _row_to_job(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get(self, job_id: int) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def list(self, owner: str | None = None, statuses: Iterable[JobStatus | str] | None = None,
             limit: int = 50, offset: int = 0) -> list[Job]:
        """Newest first."""
        where, params = self._filters(owner, statuses)
        sql = f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ? OFFSET ?"
        with self.db.read() as conn:
            rows = conn.execute(sql, [*params, int(limit), int(offset)]).fetchall()
        return [_row_to_job(r) for r in rows]

    def count(self, owner: str | None = None, statuses: Iterable[JobStatus | str] | None = None) -> int:
        where, params = self._filters(owner, statuses)
        with self.db.read() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0])

    @staticmethod
    def _filters(owner: str | None, statuses: Iterable[JobStatus | str] | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if statuses is not None:
            values = [JobStatus(s).value for s in statuses]
            clauses.append(f"status IN ({_in_clause(values)})" if values else "0")
            params.extend(values)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    def queued(self) -> list[Job]:
        """Queued jobs in launch order: higher priority first, then queue position."""
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY priority DESC, queue_pos, id",
                (JobStatus.QUEUED.value,),
            ).fetchall()
        return [_row_to_job(r) for r in rows]

    def active(self) -> list[Job]:
        with self.db.read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE status IN ({_in_clause(_ACTIVE)}) ORDER BY id", _ACTIVE
            ).fetchall()
        return [_row_to_job(r) for r in rows]

    def update(self, job_id: int, **values: Any) -> None:
        """Set fields unconditionally (progress, pid, ...)."""
        if not values:
            return
        values["updated_at"] = time.time()
        names = list(values)
        with self.db.connect() as conn:
            conn.execute(
                f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                [*(_encode(n, values[n]) for n in names), job_id],
            )

    def transition(self, job_id: int, from_statuses: Iterable[JobStatus], to_status: JobStatus,
                   event: str = "", **values: Any) -> bool:
        """Compare-and-set the status; False when the job was not in one of `from_statuses`."""
        allowed = [JobStatus(s).value for s in from_statuses]
        values["status"] = to_status
        values["updated_at"] = time.time()
        names = list(values)
        with self.db.connect() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} "
                f"WHERE id = ? AND status IN ({_in_clause(allowed)})",
                [*(_encode(n, values[n]) for n in names), job_id, *allowed],
            )
            if cursor.rowcount != 1:
                return False
            self._event(conn, job_id, to_status.value, event)
        return True

    def queue_front_position(self) -> tuple[int, float]:
        """(highest queued priority, a queue_pos before every queued job)."""
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT COALESCE(MAX(priority), 0) AS pr, COALESCE(MIN(queue_pos), 1) AS pos "
                "FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,)
            ).fetchone()
        return int(row["pr"]), float(row["pos"]) - 1

    # ---- events --------------------------------------------------------------------------------
    def add_event(self, job_id: int, kind: str, message: str = "") -> None:
        with self.db.connect() as conn:
            self._event(conn, job_id, kind, message)

    @staticmethod
    def _event(conn: sqlite3.Connection, job_id: int, kind: str, message: str) -> None:
        conn.execute("INSERT INTO job_events(job_id, time, kind, message) VALUES (?, ?, ?, ?)",
                     (job_id, time.time(), kind, message))

    def events(self, job_id: int) -> list[JobEvent]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT job_id, time, kind, message FROM job_events WHERE job_id = ? "
                                "ORDER BY id", (job_id,)).fetchall()
        return [JobEvent(**dict(r)) for r in rows]

    # ---- devices and ports ---------------------------------------------------------------------
    def devices_in_use(self) -> set[int]:
        """Devices of active jobs plus devices held by other users (inference)."""
        used: set[int] = set()
        for job in self.active():
            used.update(job.gpus_assigned)
        used.update(h.device for h in self.holds())
        return used

    def ports_in_use(self) -> set[int]:
        return {job.master_port for job in self.active() if job.master_port is not None}

    def claim(self, job_id: int, devices: Sequence[int], master_port: int | None, **values: Any) -> bool:
        """queued -> starting with `devices` and `master_port`, only if no active job or hold uses them.

        One transaction, so a concurrent `hold_devices` (another process) can never overlap it.
        """
        with self.db.connect() as conn:
            busy: set[int] = {int(r["device"]) for r in conn.execute("SELECT device FROM device_holds")}
            ports: set[int] = set()
            for row in conn.execute(f"SELECT gpus_assigned, master_port FROM jobs WHERE status IN "
                                    f"({_in_clause(_ACTIVE)})", _ACTIVE):
                busy.update(int(x) for x in row["gpus_assigned"].split(",") if x)
                if row["master_port"] is not None:
                    ports.add(int(row["master_port"]))
            if busy & set(devices) or (master_port is not None and master_port in ports):
                return False
            return self.transition(job_id, [JobStatus.QUEUED], JobStatus.STARTING,
                                   event=f"devices {list(devices)} port {master_port}",
                                   gpus_assigned=list(devices), master_port=master_port, **values)

    def hold_devices(self, holder: str, devices: Sequence[int], pid: int, pid_start_time: float | None) -> bool:
        """Record `holder` on every device, all or nothing (another holder on one -> False)."""
        try:
            with self.db.connect() as conn:
                active_devices: set[int] = set()
                for row in conn.execute(f"SELECT gpus_assigned FROM jobs WHERE status IN ({_in_clause(_ACTIVE)})",
                                        _ACTIVE):
                    active_devices.update(int(x) for x in row["gpus_assigned"].split(",") if x)
                if active_devices & set(devices):
                    raise sqlite3.IntegrityError("device held by a job")
                now = time.time()
                conn.executemany(
                    "INSERT INTO device_holds(device, holder, pid, pid_start_time, acquired_at) VALUES (?, ?, ?, ?, ?)",
                    [(d, holder, pid, pid_start_time, now) for d in devices],
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def release_holds(self, holder: str) -> int:
        with self.db.connect() as conn:
            return conn.execute("DELETE FROM device_holds WHERE holder = ?", (holder,)).rowcount

    def release_holds_of_pid(self, pid: int) -> int:
        with self.db.connect() as conn:
            return conn.execute("DELETE FROM device_holds WHERE pid = ?", (pid,)).rowcount

    def holds(self) -> list[DeviceHold]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT * FROM device_holds ORDER BY device").fetchall()
        return [DeviceHold(**dict(r)) for r in rows]
