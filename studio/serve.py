"""Start the studio: logging, services, Blocks, launch."""
from __future__ import annotations

import logging

from studio.context import StudioContext
from studio.logging_setup import configure_logging
from studio.settings import StudioSettings

log = logging.getLogger(__name__)


def serve(settings: StudioSettings, *, block: bool = True):
    """Build and launch the app; returns 0 when it stops (block) or the running app (block=False)."""
    configure_logging(settings.home / "logs", settings.log_level)
    ctx = StudioContext.create(settings)
    from studio.shell import build_app, launch_kwargs

    app = build_app(ctx)
    log.info("serving on http://%s:%d (data in %s)", settings.host, settings.port, ctx.layout.home)
    app.queue(api_open=False)
    app.launch(prevent_thread_lock=not block, **launch_kwargs(ctx))
    if not block:
        return app
    ctx.close()
    return 0
