"""`python app.py` serves a page with the four tabs (a real process on a real port)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_app_serves_page(studio_home: Path, port: int) -> None:
    log = studio_home / "app.out"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--home", str(studio_home)],
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        body = ""
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert "<html" in body.lower()
        config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10).read().decode()
        for tab in ("Train", "Infer", "Gallery", "GPUs"):
            assert f'"{tab}"' in config
        assert (studio_home / "logs" / "studio.log").exists()
        assert (studio_home / "studio.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
