"""Logging configured once for the app and the CLI: console + rotating file in the data directory."""
from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_TAG = "_studio_handler"


def configure_logging(logs_dir: Path, level: str = "INFO") -> None:
    """Idempotent: a second call replaces the studio's handlers instead of stacking them."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    logs_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        logs_dir / "studio.log", maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8")
    console = logging.StreamHandler()
    for handler in (file_handler, console):
        handler.setFormatter(logging.Formatter(FORMAT))
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter at INFO drowns the studio's own lines.
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
