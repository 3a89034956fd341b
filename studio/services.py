"""The engine services built from the studio settings, in one place: the web app's context and every
CLI command open them here (no Gradio)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.gallery import Gallery
from engine.gpus import GpuInventory
from engine.paths import DataLayout
from engine.scheduler import Scheduler
from engine.store.db import Database
from engine.store.jobs import JobStore
from studio.settings import StudioSettings

if TYPE_CHECKING:
    from engine.inference.service import InferenceService


@dataclass
class Services:
    settings: StudioSettings
    layout: DataLayout
    db: Database
    gpus: GpuInventory
    scheduler: Scheduler
    gallery: Gallery

    def inference(self) -> "InferenceService":
        """The generation queue (its workers start on demand; shut it down when done)."""
        from engine.inference.service import InferenceService

        return InferenceService(self.db, self.layout, self.scheduler, self.gallery,
                                idle_timeout_s=self.settings.worker_idle_timeout_s,
                                speed=self.settings.inference_speed())


def open_services(settings: StudioSettings, *, poll_interval_s: float | None = None) -> Services:
    layout = DataLayout(settings.home.resolve()).ensure()
    db = Database(layout.db_path)
    gpus = GpuInventory(ttl_s=2.0)
    scheduler = Scheduler(JobStore(db), layout, gpus, cpu_slots=settings.cpu_slots, nodes=settings.nodes(),
                          poll_interval_s=poll_interval_s or settings.poll_interval_s)
    return Services(settings, layout, db, gpus, scheduler, Gallery(db, layout))
