"""Expiring links: the only way a run's or a gallery item's file reaches the browser.

Gradio serves every file under `allowed_paths` to any signed-in user who names it, and run and
gallery folders have guessable names. So neither tree is allowed: a handler that has checked the
owner hands out a link instead, `served/<random token>/<file name>` (a hard link, or a copy across
filesystems). Only the `served/` folder is in `allowed_paths`; a token is 128 random bits and its
folder is deleted after `ttl_s`. Gradio then copies the file into its cache under a hash keyed by
a secret seed, as it does for every file a handler returns.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 3600.0


class FileLinks:
    def __init__(self, root: Path, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.root = root
        self.ttl_s = ttl_s

    def link(self, source: str | Path) -> str:
        """A fresh, unguessable path to `source` (checked by the caller) for Gradio to serve."""
        source = Path(source)
        self.sweep()
        folder = self.root / secrets.token_hex(16)
        folder.mkdir(parents=True)
        target = folder / source.name
        try:
            target.hardlink_to(source)
        except OSError:  # another filesystem: a copy
            shutil.copyfile(source, target)
        return str(target)

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
