"""Expiring links: the only way a run's or a gallery item's file reaches the browser.

Gradio serves every file under `allowed_paths` to any signed-in user who names it, and run and
gallery folders have guessable names. So neither tree is allowed: a handler that has checked the
owner hands out a link instead, `served/<random token>/<file name>` (a hard link, or a copy across
filesystems). Only the `served/` folder is in `allowed_paths`; a token is 128 random bits and its
folder is deleted after `ttl_s` (a sweeper thread checks every minute). The folder is also a Gradio
static path (`serve_links_in_place`): Gradio serves a link where it lies instead of copying it into
its cache, whose copies would live on under a URL that never expires.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 3600.0


class FileLinks:
    def __init__(self, root: Path, ttl_s: float = DEFAULT_TTL_S, sweep_every_s: float = 60.0) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.sweep_every_s = sweep_every_s
        self._sweeper: threading.Thread | None = None

    def link(self, source: str | Path) -> str:
        """A fresh, unguessable path to `source` (checked by the caller) for Gradio to serve."""
        source = Path(source)
        self.sweep()
        self._start_sweeper()
        folder = self.root / secrets.token_hex(16)
        folder.mkdir(parents=True)
        target = folder / source.name
        try:
            target.hardlink_to(source)
        except OSError:  # another filesystem: a copy
            shutil.copyfile(source, target)
        return str(target)

    def _start_sweeper(self) -> None:
        """Links expire on time even when nobody asks for a new one (a thread, once per process)."""
        if self._sweeper is not None:
            return

        def loop() -> None:
            while True:
                time.sleep(self.sweep_every_s)
                try:
                    self.sweep()
                except Exception:  # a sweep must never end the sweeper
                    log.warning("could not sweep expired links", exc_info=True)

        self._sweeper = threading.Thread(target=loop, daemon=True, name="link-sweeper")
        self._sweeper.start()

    def sweep(self, now: float | None = None) -> int:
        """Delete the links older than the time to live; returns how many went."""
        if not self.root.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - self.ttl_s
        gone = 0
        for folder in self.root.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
                    gone += 1
            except OSError:  # swept by another process meanwhile
                continue
        return gone


def serve_links_in_place(root: Path) -> None:
    """Make Gradio serve the links under `root` where they lie, never as cache copies: a file a
    handler returns (a gr.Video value) is otherwise copied into Gradio's cache, served to anyone who
    has its URL, and not deleted when the link expires."""
    import gradio as gr

    from gradio.data_classes import _StaticFiles  # the list set_static_paths extends (no duplicates)

    if root.resolve() not in _StaticFiles.all_paths:
        gr.set_static_paths([root])


def link_epoch(ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> int:
    """A number that changes every half time-to-live: HTML holding links (a grid of videos) is rebuilt
    when it changes, so no link it shows is older than the time to live."""
    return int((time.time() if now is None else now) // (ttl_s / 2))


def served_url(link: str | Path) -> str:
    """The URL Gradio serves a link under, for HTML a handler writes (a `<video src>`); relative, so it
    works under a proxy's root path too."""
    return "gradio_api/file=" + urllib.parse.quote(str(link))


def redact_home(text: str | None, home: Path) -> str | None:
    """`text` with the data directory's location replaced by a placeholder (users never see it)."""
    if not text:
        return text
    for form in {str(home.resolve()), str(home)}:
        text = text.replace(form, "<studio data>")
    return text
