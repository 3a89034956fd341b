"""SQL of generation requests: durable like jobs, so a restart answers "lost", never "not found".

Each row records the service process that runs it (pid + start time): a later service adopts the
queued requests of a service that is gone and marks the ones it was running as lost. A cancel from
another process sets `cancel_requested`; the owning service polls for it and stops the request.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from engine.store.db import Database

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE generation_requests (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        request_json TEXT NOT NULL,
        model_path TEXT NOT NULL,
        lora_files_json TEXT NOT NULL DEFAULT '[]',
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        error_kind TEXT,
        gallery_ids_json TEXT NOT NULL DEFAULT '[]',
        timings_json TEXT NOT NULL DEFAULT '{}',
        worker TEXT,
        service_pid INTEGER,
        service_start_time REAL,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX generation_requests_owner ON generation_requests(owner, created_at DESC);
    CREATE INDEX generation_requests_state ON generation_requests(state);
    """,
    # v2: a cancel asked by another process (CLI, API of another app); the owning service reads it
    "ALTER TABLE generation_requests ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;",
    # v3: what the request said before it started (a long CPU estimate): a recovered request keeps it
    "ALTER TABLE generation_requests ADD COLUMN warning TEXT;",
]

_JSON_COLUMNS = {"request": "request_json", "lora_files": "lora_files_json", "gallery_ids": "gallery_ids_json",
                 "timings": "timings_json"}


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    """Field names -> column values (lists and dicts as JSON)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        column = _JSON_COLUMNS.get(name)
        out[column or name] = json.dumps(value) if column else value
    return out


def _row(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name, column in _JSON_COLUMNS.items():
        data[name] = json.loads(data.pop(column))
    return data


class RequestStore:
    """Rows of generation requests; values are the fields of `engine.inference.tracking.Tracked`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("generation_requests", MIGRATIONS)

    def insert(self, **values: Any) -> None:
        now = time.time()
        columns = _columns({"created_at": now, **values, "updated_at": now})
        with self.db.connect() as conn:
            conn.execute(f"INSERT INTO generation_requests({', '.join(columns)}) "
                         f"VALUES ({', '.join('?' for _ in columns)})", list(columns.values()))

    def update(self, request_id: str, *, unless_states: Iterable[str] = (), **values: Any) -> bool:
        """Write `values`; skipped (False) while the row is in one of `unless_states` (ended ones)."""
        columns = _columns({**values, "updated_at": time.time()})
        blocked = list(unless_states)
        where = "id = ?" + (f" AND state NOT IN ({', '.join('?' for _ in blocked)})" if blocked else "")
        with self.db.connect() as conn:
            cursor = conn.execute(f"UPDATE generation_requests SET {', '.join(f'{c} = ?' for c in columns)} "
                                  f"WHERE {where}", [*columns.values(), request_id, *blocked])
            return cursor.rowcount > 0

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM generation_requests WHERE id = ?", (request_id,)).fetchone()
        return _row(row) if row else None

    def list(self, owner: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        where, params = ("WHERE owner = ?", [owner]) if owner is not None else ("", [])
        with self.db.read() as conn:
            rows = conn.execute(f"SELECT * FROM generation_requests {where} ORDER BY created_at DESC, id "
                                "LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
        return [_row(r) for r in rows]

    def cancels_asked(self, service_pid: int) -> list[str]:
        """Ids of the unfinished requests of that service process that another process asked to cancel."""
        with self.db.read() as conn:
            rows = conn.execute("SELECT id FROM generation_requests WHERE cancel_requested = 1 AND service_pid = ? "
                                "AND state NOT IN ('succeeded', 'failed', 'cancelled', 'lost')",
                                (service_pid,)).fetchall()
        return [r["id"] for r in rows]

    def unfinished(self, states: Iterable[str]) -> list[dict[str, Any]]:
        wanted = list(states)
        with self.db.read() as conn:
            rows = conn.execute(f"SELECT * FROM generation_requests WHERE state IN ({', '.join('?' for _ in wanted)}) "
                                "ORDER BY created_at, id", wanted).fetchall()
        return [_row(r) for r in rows]
