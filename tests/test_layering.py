"""The layers: the engine and the studio's services work without Gradio (scripts, the CLI and the
trainer never load it); only the app shell, the HTTP API module and the tabs import it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICES = ["studio.api", "studio.services", "studio.context", "studio.datasets", "studio.auth", "studio.settings", "studio.cli",
            "studio.cli.train", "studio.cli.jobs", "studio.cli.infer", "studio.cli.gallery"]


def engine_modules() -> list[str]:
    names = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            parts = parts[:-1]
        names.append(".".join(parts))
    return sorted(set(names))


def test_engine_and_services_import_without_gradio() -> None:
    modules = engine_modules() + SERVICES
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'gradio' or m.startswith('gradio.')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"gradio imported by the engine or a service: {result.stdout[:500]}"
    assert len(modules) > 40  # the scan found the engine's modules
