"""A person's path through all four tabs in headless chromium: load a TOML, start training, watch the
loss chart gain points, stop the run, generate with its LoRA, see the video play, find it in the gallery."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ui_support import REPO_ROOT, start_server, stop_server, train_toml

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
LONG = 240_000  # ms: a loaded 2-core machine trains and renders slowly


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("browser"), free_port(), auth=False)
    yield srv
    stop_server(srv)


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("chromium is missing: run scripts/install-chromium.sh")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)


def pick_option(page, selector: str, text: str | re.Pattern, timeout_s: float = 90, query: str = "") -> None:
    """Open a dropdown and pick the option containing `text`; its choices may arrive a moment later.

    `query` is typed into the dropdown first, as a user narrows a long list (a long list does not
    render every option)."""
    deadline = time.time() + timeout_s
    while True:
        page.locator(selector).click()
        if query:
            page.locator(selector).fill(query)
        option = page.get_by_role("option", name=text).first
        try:
            option.wait_for(timeout=3_000)
            option.click()
            return
        except Exception:
            if time.time() > deadline:
                raise
            page.keyboard.press("Escape")


def loss_points(page) -> int:
    return page.evaluate("""() => {
        const plot = document.querySelector('#train-loss .js-plotly-plot');
        if (!plot || !plot.data || !plot.data.length) return 0;
        return (plot.data[0].x || []).length;
    }""")


def test_train_watch_generate_and_find(server, page, tmp_path: Path) -> None:
    try:
        walk_through(server, page, tmp_path)
    except Exception:
        shot(page, "failure")
        raise


def walk_through(server, page, tmp_path: Path) -> None:
    page.goto(server.url)
    page.wait_for_selector("#train-start")
    # ---- Train: load a TOML file into the form, start, watch the chart
    toml_file = tmp_path / "browser_run.toml"
    # Long enough to outlast watching + Stop on a fast idle machine; no periodic saves, so the run's
    # only LoRA is the one Stop writes (a long list of saves made the LoRA picker flaky).
    toml_file.write_text(train_toml(server.model, server.dataset, epochs=600)
                         .replace("save_every_n_epochs = 1\n", "save_every_n_epochs = 600\n"))
    page.locator("input[type=file][accept*='.toml']").set_input_files(str(toml_file))
    page.wait_for_function("(p) => document.querySelector('#train-folder input')?.value === p",
                           arg=str(server.dataset))
    page.locator("#train-check").click()
    page.wait_for_selector("text=4 files in shapes")
    page.get_by_label("Run name").fill("browser-run")
    page.locator("#train-start").click()
    page.wait_for_selector("text=queued run #")
    page.wait_for_function("() => document.querySelector('#train-loss .js-plotly-plot')?.data?.[0]?.x?.length >= 1",
                           timeout=LONG)
    first = loss_points(page)
    # More points arrive while it runs.
    page.wait_for_function(f"""() => {{ const n = document.querySelector('#train-loss .js-plotly-plot').data[0].x.length;
        return n > {first} && n >= 6; }}""", timeout=LONG)
    assert loss_points(page) > first
    page.locator("#job-stop").click()
    page.wait_for_selector("#train-job-status .status-badge:text('stopped')", timeout=LONG)
    shot(page, "1-train")

    # ---- Infer: the trained LoRA, small size, Generate, the video plays
    page.get_by_role("tab", name="Infer").click()
    model = page.locator("#infer-model input")
    model.fill(server.model)
    model.press("Enter")
    page.locator("#lora-add").click()
    pick_option(page, "#lora-ref-0 input", re.compile(r"browser-run · (epoch|step)\d+$"), query="browser-run")
    saved = page.locator("#lora-ref-0 input").input_value().rsplit("·", 1)[-1].strip()  # e.g. step121
    assert re.fullmatch(r"(epoch|step)\d+", saved), saved
    for field, value in (("#infer-width", "64"), ("#infer-height", "48"), ("#infer-frames", "9"),
                         ("#infer-seed", "5")):
        page.locator(f"{field} input").fill(value)
    page.locator("#infer-steps input[type=number]").fill("3")
    page.locator("#infer-steps input[type=number]").press("Enter")
    page.locator("#infer-generate").click()
    page.wait_for_selector("#infer-video video", timeout=LONG)
    page.wait_for_function("""() => { const v = document.querySelector('#infer-video video');
        // 64x48 generated; shown enlarged with nearest-neighbour (display.mp4), same aspect
        return v && v.readyState >= 2 && v.videoWidth % 64 === 0 && v.videoWidth * 48 === v.videoHeight * 64; }""",
                       timeout=60_000)
    page.evaluate("() => { const v = document.querySelector('#infer-video video'); v.muted = true; return v.play(); }")
    page.wait_for_function("() => document.querySelector('#infer-video video').currentTime > 0", timeout=30_000)
    assert "seed 5" in page.locator("#infer-gallery-link").inner_text()
    shot(page, "2-infer")

    # ---- Gallery: "Open in Gallery" shows the entry; search finds it in the grid
    page.locator("#infer-open-gallery").click()
    page.wait_for_selector(f"#gallery-details >> text={saved}", timeout=60_000)
    assert page.get_by_role("tab", name="Gallery").get_attribute("aria-selected") == "true"
    page.locator("#gallery-search input, #gallery-search textarea").first.fill("purple star")
    page.locator("#gallery-search input, #gallery-search textarea").first.press("Enter")
    page.wait_for_selector("#gallery-grid .gallery-item button", timeout=60_000)
    page.locator("#gallery-grid .gallery-item button").first.click()
    page.wait_for_selector("#gallery-details >> text=seed", timeout=60_000)
    assert saved in page.locator("#gallery-details").inner_text()
    shot(page, "3-gallery")
    # "Reuse in Infer" fills the Infer tab with the same settings and LoRA stack
    page.get_by_role("tab", name="Infer").click()
    page.locator("#infer-seed input").fill("99")
    page.locator("#infer-steps input[type=number]").fill("7")
    page.get_by_role("tab", name="Gallery").click()
    page.locator("#gallery-reuse").click()
    page.wait_for_function("() => document.querySelector('#infer-seed input')?.value === '5'", timeout=60_000)
    assert page.get_by_role("tab", name="Infer").get_attribute("aria-selected") == "true"
    assert page.locator("#lora-ref-0 input").input_value().endswith(saved)
    assert page.locator("#infer-steps input[type=number]").input_value() == "3"

    # ---- GPUs: a plain message on this CPU machine, host RAM and disk
    page.get_by_role("tab", name="GPUs").click()
    page.wait_for_selector("#gpus-host >> text=Host RAM", timeout=60_000)
    assert page.locator("#gpus-none").is_visible()
    shot(page, "4-gpus")
