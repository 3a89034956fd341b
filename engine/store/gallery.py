"""SQL of gallery items and their LoRA stacks. Nothing outside this module writes these tables."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.store.db import Database

__all__ = ["GalleryStore", "GalleryFilter", "MIGRATIONS"]

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE gallery_items (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        request_id TEXT,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        num_frames INTEGER NOT NULL,
        fps INTEGER NOT NULL,
        params_json TEXT NOT NULL,
        timings_json TEXT NOT NULL DEFAULT '{}',
        digest TEXT NOT NULL DEFAULT '',
        favorite INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX gallery_items_created ON gallery_items(created_at DESC, id);
    CREATE INDEX gallery_items_owner ON gallery_items(owner, created_at DESC);
    CREATE TABLE gallery_loras (
        item_id TEXT NOT NULL REFERENCES gallery_items(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        path TEXT NOT NULL,
        name TEXT NOT NULL,
        weight REAL NOT NULL,
        PRIMARY KEY (item_id, position)
    );
    CREATE INDEX gallery_loras_name ON gallery_loras(name);
    """,
]

_ITEM_COLUMNS = ("id", "owner", "created_at", "request_id", "model", "prompt", "negative_prompt", "seed", "width",
                 "height", "num_frames", "fps", "params_json", "timings_json", "digest", "favorite")


@dataclass(frozen=True)
class GalleryFilter:
    owner: str | None = None
    query: str | None = None  # substring of the prompt (case-insensitive)
    model: str | None = None  # substring of the model name or path
    lora: str | None = None  # substring of any LoRA's name or path
    favorite: bool | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if self.owner is not None:
            clauses.append("owner = ?")
            args.append(self.owner)
        if self.query:
            clauses.append("prompt LIKE ? ESCAPE '\\'")
            args.append(_like(self.query))
        if self.model:
            clauses.append("model LIKE ? ESCAPE '\\'")
            args.append(_like(self.model))
        if self.lora:
            clauses.append("id IN (SELECT item_id FROM gallery_loras WHERE name LIKE ? ESCAPE '\\' "
                           "OR path LIKE ? ESCAPE '\\')")
            args += [_like(self.lora)] * 2
        if self.favorite is not None:
            clauses.append("favorite = ?")
            args.append(1 if self.favorite else 0)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class GalleryStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("gallery", MIGRATIONS)

    def insert(self, item: dict[str, Any], loras: list[dict[str, Any]]) -> None:
        row = {**item, "params_json": json.dumps(item["params_json"], sort_keys=True, default=str),
               "timings_json": json.dumps(item["timings_json"], sort_keys=True)}
        with self.db.connect() as conn:
            conn.execute(
                f"INSERT INTO gallery_items ({', '.join(_ITEM_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _ITEM_COLUMNS)})",
                [row.get(c) for c in _ITEM_COLUMNS],
            )
            conn.executemany(
                "INSERT INTO gallery_loras(item_id, position, path, name, weight) VALUES (?, ?, ?, ?, ?)",
                [(item["id"], i, lora["path"], lora["name"], float(lora["weight"])) for i, lora in enumerate(loras)],
            )

    def exists(self, item_id: str) -> bool:
        with self.db.read() as conn:
            return conn.execute("SELECT 1 FROM gallery_items WHERE id = ?", (item_id,)).fetchone() is not None

    def get(self, item_id: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM gallery_items WHERE id = ?", (item_id,)).fetchone()
            return self._with_loras(conn, [row])[0] if row else None

    def list(self, filters: GalleryFilter, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        where, args = filters.where()
        with self.db.read() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM gallery_items{where}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT * FROM gallery_items{where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return self._with_loras(conn, rows), int(total)

    def set_favorite(self, item_id: str, value: bool) -> bool:
        with self.db.connect() as conn:
            cur = conn.execute("UPDATE gallery_items SET favorite = ? WHERE id = ?", (1 if value else 0, item_id))
            return cur.rowcount > 0

    def delete(self, item_id: str) -> bool:
        with self.db.connect() as conn:
            conn.execute("DELETE FROM gallery_loras WHERE item_id = ?", (item_id,))
            return conn.execute("DELETE FROM gallery_items WHERE id = ?", (item_id,)).rowcount > 0

    @staticmethod
    def _with_loras(conn: Any, rows: list[Any]) -> list[dict[str, Any]]:
        items = []
        for row in rows:
            item = dict(row)
            item["params"] = json.loads(item.pop("params_json"))
            item["timings"] = json.loads(item.pop("timings_json"))
            item["favorite"] = bool(item["favorite"])
            item["loras"] = [dict(r) for r in conn.execute(
                "SELECT path, name, weight FROM gallery_loras WHERE item_id = ? ORDER BY position", (item["id"],))]
            items.append(item)
        return items
