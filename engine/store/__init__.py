"""SQLite persistence. All SQL of the studio lives in this package."""
from engine.store.db import Database

__all__ = ["Database"]
