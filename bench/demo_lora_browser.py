"""The demo LoRA's video as a person sees it: the studio in headless chromium, the Infer tab, model
'demo', the held-out prompt, the demo LoRA (uploaded), Generate; then a screenshot of the page with the
video paused mid-clip, and a contact sheet of the mp4 the gallery kept (every other frame, enlarged).

    python bench/demo_lora_browser.py LORA.safetensors [--seed 0] [--out bench/demo_lora_browser.png]

Prints one JSON line (the screenshot, the sheet, the generation's wall time and the evaluator's reading).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.test_browser_studio import pick_option  # noqa: E402
from tests.ui_support import wait_for  # noqa: E402

PROMPT = "a purple star moving right on a white background"
LORA_NAME = "demo_purple_star.safetensors"


def start_app(home: Path):
    import os
    import subprocess
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--home", str(home)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "STUDIO_HOME": str(home)})
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            return urllib.request.urlopen(url, timeout=5).status == 200
        except OSError:
            return False

    wait_for(up, 240, "the studio to serve its page")
    return proc, url


def generate_in_browser(url: str, seed: int, screenshot: Path) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_role("tab", name="Infer").click()
        page.locator("#infer-model input").fill("demo")
        page.locator("#infer-prompt textarea").fill(PROMPT)
        page.locator("#lora-add").click()
        pick_option(page, "#lora-ref-0 input", f"uploaded · {LORA_NAME}")
        page.locator("#infer-seed input").fill(str(seed))
        started = time.time()
        page.locator("#infer-generate").click()
        page.wait_for_selector("#infer-video video", timeout=600_000)
        seconds = time.time() - started
        page.wait_for_function("() => { const v = document.querySelector('#infer-video video'); return v && v.readyState >= 2; }")
        # Paused on a middle frame: what a person sees while the clip plays.
        page.evaluate("""() => { const v = document.querySelector('#infer-video video'); v.pause();
            v.currentTime = v.duration / 2; }""")
        page.wait_for_timeout(800)
        page.locator("#infer-result").screenshot(path=str(screenshot))
        browser.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "demo_lora_browser.png")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    from engine.demo.evaluate import accuracy, evaluate_clip
    from engine.media import contact_sheet, read_video

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        (home / "uploads" / "local" / "loras").mkdir(parents=True)
        shutil.copy(args.lora, home / "uploads" / "local" / "loras" / LORA_NAME)
        proc, url = start_app(home)
        try:
            seconds = generate_in_browser(url, args.seed, args.out)
        finally:
            proc.terminate()
            proc.wait(30)
        videos = [p for p in (home / "gallery").rglob("*.mp4") if p.name != "display.mp4"]
        frames = read_video(max(videos, key=lambda p: p.stat().st_mtime))
    sheet = args.out.with_name(args.out.stem + "_frames.png")
    Image.fromarray(contact_sheet([np.asarray(frames)], every=2, factor=4)).save(sheet)
    score = evaluate_clip(frames, PROMPT)
    print(json.dumps({"bench": "demo_lora_browser", "screenshot": str(args.out.relative_to(REPO)),
                      "frames": str(sheet.relative_to(REPO)), "browser_generate_s": round(seconds, 1),
                      "reading": accuracy([score]), "observed": str(score.observed)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
