"""The composition root: builds the engine's services once and hands them to the tabs."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.paths import DataLayout
from engine.store import Database
from studio.settings import StudioSettings

log = logging.getLogger(__name__)


@dataclass
class StudioContext:
    settings: StudioSettings
    layout: DataLayout
    db: Database

    @classmethod
    def create(cls, settings: StudioSettings) -> "StudioContext":
        layout = DataLayout(settings.home.resolve()).ensure()
        db = Database(layout.db_path)
        return cls(settings=settings, layout=layout, db=db)

    def close(self) -> None:
        self.db.close()
