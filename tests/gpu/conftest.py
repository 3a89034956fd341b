"""The GPU acceptance suite: every test here is marked `gpu` and skipped (with the reason shown)
where nvidia-smi shows too few GPUs. Run it on a GPU machine with `make test-gpu`."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
