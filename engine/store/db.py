"""One SQLite database file with per-component migrations.

WAL lets the UI read while the scheduler writes; synchronous=FULL keeps committed state through a
power loss (job records must survive crashes). Keep the file on local disk: WAL breaks on NFS.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000


class Database:
    """A SQLite file shared by the engine's components (jobs, gallery, users)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # journal_mode cannot change inside a transaction; it persists in the file.
        self._connection().execute("PRAGMA journal_mode=WAL")
        with self.connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions ("
                " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread: sqlite3 connections must not cross threads.
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error).

        Nested use in the same thread joins the outer transaction.
        """
        conn = self._connection()
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads only: no write lock, so polling never waits behind writers."""
        yield self._connection()

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Apply the not-yet-applied migrations of `component` in order; returns the new version.

        Each entry is one SQL script; entries are append-only (never edit a released one).
        """
        with self.connect() as conn:
            row = conn.execute(
                "SELECT version FROM schema_versions WHERE component = ?", (component,)
            ).fetchone()
            current = row["version"] if row else 0
            if current > len(migrations):
                raise RuntimeError(
                    f"database {self.path} has {component} schema v{current}, newer than this "
                    f"code (v{len(migrations)}); upgrade the studio"
                )
            for version in range(current + 1, len(migrations) + 1):
                log.info("migrating %s schema to v%d", component, version)
                for statement in _split_sql(migrations[version - 1]):
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_versions(component, version) VALUES (?, ?) "
                "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, len(migrations)),
            )
        return len(migrations)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit our transaction)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
