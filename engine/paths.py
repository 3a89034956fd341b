"""Where everything lives inside the data directory (STUDIO_HOME)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str, fallback: str = "dataset") -> str:
    """A file or folder name made from user input: no separators, no leading dot, at most 80 characters."""
    cleaned = _SAFE_NAME.sub("-", text.strip()).strip("-.")
    return cleaned[:80] or fallback


def user_folder(owner: str) -> str:
    """The name of a user's own folder under uploads/, runs/ and gallery/ (never starts with a dot,
    so it cannot clash with a hidden folder such as gallery/.staging)."""
    return safe_name(owner, "user")


@dataclass(frozen=True)
class DataLayout:
    """Paths of the data directory; `ensure()` creates the folders."""

    home: Path

    @property
    def db_path(self) -> Path:
        return self.home / "studio.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def gallery_dir(self) -> Path:
        return self.home / "gallery"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def latent_cache_dir(self) -> Path:
        return self.cache_dir / "latents"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"

    @property
    def exports_dir(self) -> Path:
        return self.home / "exports"

    @property
    def workers_dir(self) -> Path:
        return self.home / "workers"

    @property
    def served_dir(self) -> Path:
        """Expiring links to files a user may download (studio.files); the only folder Gradio serves."""
        return self.home / "served"

    def ensure(self) -> "DataLayout":
        for folder in (self.logs_dir, self.runs_dir, self.gallery_dir, self.latent_cache_dir,
                       self.datasets_dir, self.uploads_dir, self.exports_dir, self.workers_dir, self.served_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self
