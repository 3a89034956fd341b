from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from engine.store import Database


def test_wal_and_full_sync(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    with db.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_migrations_apply_once_and_in_order(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    migrations = ["CREATE TABLE a (x INTEGER);", "ALTER TABLE a ADD COLUMN y TEXT;\nCREATE INDEX a_y ON a(y);"]
    assert db.migrate("comp", migrations[:1]) == 1
    assert db.migrate("comp", migrations) == 2
    assert db.migrate("comp", migrations) == 2  # nothing re-applied
    reopened = Database(tmp_path / "s.db")
    with reopened.read() as conn:
        cols = [r["name"] for r in conn.execute("PRAGMA table_info(a)")]
    assert cols == ["x", "y"]
    with pytest.raises(RuntimeError, match="newer than this code"):
        reopened.migrate("comp", migrations[:1])


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate("comp", ["CREATE TABLE t (x INTEGER NOT NULL);"])
    with pytest.raises(sqlite3.IntegrityError):
        with db.connect() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO t VALUES (NULL)")
    with db.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


def test_threads_share_one_file(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate("comp", ["CREATE TABLE t (x INTEGER);"])

    def writer(offset: int) -> None:
        for i in range(50):
            with db.connect() as conn:
                conn.execute("INSERT INTO t VALUES (?)", (offset + i,))

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 200
