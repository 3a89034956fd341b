"""Shared fixtures. Everything runs on this machine: real processes, real SQLite, real files."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tests never touch the user's data directory or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture
def studio_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data directory, also exported as STUDIO_HOME for subprocesses."""
    home = tmp_path / "studio_home"
    home.mkdir()
    monkeypatch.setenv("STUDIO_HOME", str(home))
    return home


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def api(tmp_path: Path):
    """The studio's authorised actions on a fresh data directory (services built, queue not started)."""
    from studio.api import StudioApi
    from studio.context import StudioContext
    from studio.settings import StudioSettings

    ctx = StudioContext.create(StudioSettings(home=tmp_path / "home").validate(), start=False)
    yield StudioApi(ctx)
    ctx.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Wan (real shapes, seconds per training run on a CPU core)."""
    from engine.families.wan_random import build_random_wan

    return build_random_wan(tmp_path_factory.mktemp("model") / "tiny_wan", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Captioned squares, an uncaptioned image, a video and a broken video (tests.trainer_support)."""
    from tests.trainer_support import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "shapes")
