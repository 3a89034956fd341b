"""A person's path through all four tabs in headless chromium: load a TOML, start training, watch the
loss chart gain points, stop the run, generate with its LoRA, see the video play, find it in the gallery.
Along the way: the run view in sight after Start, each control enabled only in the states it applies to,
one-click Save TOML, the log's end, readable timings; then the same studio on a phone in the dark theme.
Screenshots of every step land in test-artifacts/ (kept by CI)."""
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
               "--disable-sync", "--no-first-run",
               # Two pages (desk and phone) poll at once: neither's timers may be throttled as a background tab.
               "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
               "--disable-backgrounding-occluded-windows"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
LONG = 240_000  # ms: a loaded 2-core machine trains and renders slowly
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
CONTROLS = ("job-stop", "job-save", "job-resume", "job-cancel")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # Polls every 2 s, not 1 (tabs/*.py derive every timer from this setting): each of a page's timer
    # events (six a second at 1 s) walks Gradio's whole component tree in the browser; at 1 s a page
    # watching a run took most of a core of 2, and every click of the walk waited for it.
    srv = start_server(tmp_path_factory.mktemp("browser"), free_port(), auth=False,
                       extra_env={"STUDIO_POLL_INTERVAL_S": "2"})
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
        page = browser.new_page(viewport=DESKTOP, accept_downloads=True)
        page.set_default_timeout(60_000)
        page.on("dialog", lambda dialog: dialog.accept())  # Cancel's confirm: yes
        yield page
        browser.close()


def shot(page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=full_page)


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


def wait_in_view(page, *selectors: str, timeout_ms: float = 15_000) -> None:
    """Until each element is wholly on the screen (what a user sees without scrolling): the page scrolls
    once the click's event has answered, which a loaded machine delays."""
    page.wait_for_function("""(sels) => sels.every((sel) => { const el = document.querySelector(sel);
        const r = el && el.getBoundingClientRect(); return r && r.top >= 0 && r.bottom <= window.innerHeight; })""",
                           arg=list(selectors), timeout=timeout_ms)
    page.wait_for_timeout(400)  # the smooth scroll settles before a screenshot


def enabled_controls(page) -> set[str]:
    return {c for c in CONTROLS if page.locator(f"#{c}").is_enabled()}


def wait_controls(page, expected: set[str], timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while enabled_controls(page) != expected:
        assert time.time() < deadline, f"controls {enabled_controls(page)} != {expected}"
        time.sleep(0.3)


def tab_width(page, tab: str) -> int:
    """The page's width on `tab`, the tab in sight (read where the walk visits it, with what it shows
    there, rather than in a round of extra tab clicks); the tab must not scroll sideways."""
    assert page.get_by_role("tab", name=tab).get_attribute("aria-selected") == "true", tab
    width, scroll, client = page.evaluate("""() => [document.querySelector('.gradio-container')
        .getBoundingClientRect().width, document.documentElement.scrollWidth, document.documentElement.clientWidth]""")
    assert scroll <= client, f"{tab}: the page scrolls sideways ({scroll} > {client} px)"
    return round(width)


def test_train_watch_generate_and_find(server, page, tmp_path: Path) -> None:
    phone = page.context.browser.new_page(viewport=PHONE)  # the same studio on a phone, dark theme
    phone.set_default_timeout(60_000)
    phone.on("dialog", lambda dialog: dialog.accept())
    try:
        walk_through(server, page, phone, tmp_path)
        page.goto("about:blank")  # the desktop's walk is done; its timers would slow the phone's
        phone_gallery_and_infer(server, phone)
    except Exception:
        shot(page, "failure")
        shot(phone, "failure-phone")
        raise


def walk_through(server, page, phone, tmp_path: Path) -> None:
    page.goto(server.url)
    page.wait_for_selector("#train-start")
    # ---- Train: load a TOML file into the form, start, watch the chart
    toml_file = tmp_path / "browser_run.toml"
    # Long enough to outlast watching + Stop on a fast idle machine; no periodic saves, so the run's
    # only LoRA is the one Stop writes (a long list of saves made the LoRA picker flaky).
    toml_file.write_text(train_toml(server.model, server.dataset, epochs=5000)
                         .replace("save_every_n_epochs = 1\n", "save_every_n_epochs = 5000\n"))
    page.locator("input[type=file][accept*='.toml']").set_input_files(str(toml_file))
    page.wait_for_function("(p) => document.querySelector('#train-folder input')?.value === p",
                           arg=str(server.dataset))
    page.locator("#train-check").click()
    page.wait_for_selector("text=4 files in shapes")
    page.get_by_label("Run name").fill("browser-run")
    # Save TOML: one click downloads the form as it is now (a field changed just before included).
    page.locator("#cfg-seed input").fill("4242")
    page.locator("#cfg-seed input").press("Tab")
    page.wait_for_timeout(2_000)  # the preview's change event; no second click
    with page.expect_download() as download:
        page.locator("#train-save-toml").click()
    saved_toml = Path(download.value.path()).read_text()
    assert "seed = 4242" in saved_toml and "epochs = 5000" in saved_toml, saved_toml
    page.locator("#train-start").scroll_into_view_if_needed()
    page.locator("#train-start").click()
    page.wait_for_selector("text=queued run #")
    # The run view is in sight after Start: its status and progress, without scrolling.
    page.wait_for_selector("#train-job-status >> text=browser-run")
    wait_in_view(page, "#train-job-status", "#train-job-progress")
    shot(page, "1-train-after-start", full_page=False)  # what the screen shows
    # The phone's turn while the trainer starts up (its run holds the CPU slot from now on).
    phone_train(server, phone, toml_file)
    # Until its turn comes again the phone shows nothing: an idle studio page still takes a good part of
    # a core (its timers redraw), which the desktop's walk on 2 cores would wait for.
    phone.goto("about:blank")
    page.bring_to_front()
    page.wait_for_function("() => document.querySelector('#train-loss .js-plotly-plot')?.data?.[0]?.x?.length >= 1",
                           timeout=LONG)
    first = loss_points(page)
    # More points arrive while it runs.
    page.wait_for_function(f"""() => {{ const n = document.querySelector('#train-loss .js-plotly-plot').data[0].x.length;
        return n > {first} && n >= 6; }}""", timeout=LONG)
    assert loss_points(page) > first
    progress = page.locator("#train-job-progress").inner_text()
    assert all(word in progress for word in ("epoch", "s/step", "elapsed", "ETA")), progress
    wait_controls(page, {"job-stop", "job-save"})  # running: no resume, nothing to cancel
    shot(page, "1-train-running")
    page.locator("#job-stop").click()
    page.wait_for_selector("#train-job-status .status-badge:text('stopped')", timeout=LONG)
    wait_controls(page, {"job-resume"})
    # The saved LoRA downloads; nothing in its list looks like a delete.
    page.wait_for_selector("#train-loras >> text=safetensors", timeout=60_000)
    assert page.locator("#train-loras .label-clear-button:visible").count() == 0
    # The log shows its end: the last line is in sight, scrolled to the bottom.
    page.get_by_text("Log (the end, following)").click()
    page.wait_for_function("""() => { const t = document.querySelector('#train-log textarea');
        return t && t.value.length > 0 && t.scrollTop + t.clientHeight >= t.scrollHeight - 4; }""", timeout=30_000)
    shot(page, "1-train")
    widths = {"Train": tab_width(page, "Train")}

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
    # An out-of-range size is refused by name.
    page.locator("#infer-width input").fill("5000")
    page.locator("#infer-generate").click()
    page.wait_for_selector("text=width: must be in", timeout=30_000)
    page.locator("#infer-width input").fill("64")
    page.locator("#infer-generate").scroll_into_view_if_needed()
    page.locator("#infer-generate").click()
    wait_in_view(page, "#infer-progress")  # the progress (and the coming video) in sight
    page.wait_for_selector("#infer-video video", timeout=LONG)
    page.wait_for_function("""() => { const v = document.querySelector('#infer-video video');
        // 64x48 generated; shown enlarged with nearest-neighbour (display.mp4), same aspect
        return v && v.readyState >= 2 && v.videoWidth % 64 === 0 && v.videoWidth * 48 === v.videoHeight * 64; }""",
                       timeout=60_000)
    page.evaluate("() => { const v = document.querySelector('#infer-video video'); v.muted = true; return v.play(); }")
    page.wait_for_function("() => document.querySelector('#infer-video video').currentTime > 0", timeout=30_000)
    assert "seed 5" in page.locator("#infer-gallery-link").inner_text()
    timings = page.locator("#infer-timings").inner_text()
    assert "total" in timings and "denoise" in timings and not re.search(r"\d\.\d{4}", timings), timings
    shot(page, "2-infer")
    widths["Infer"] = tab_width(page, "Infer")
    # Generate again: the earlier video and timings go with the new request, the new ones come.
    page.locator("#infer-generate").click()
    page.wait_for_function("() => !document.querySelector('#infer-video video')", timeout=10_000)
    assert page.locator("#infer-timings table").count() == 0
    page.wait_for_selector("#infer-video video", timeout=LONG)

    # ---- Gallery: "Open in Gallery" shows the entry; search finds it in the grid
    page.locator("#infer-open-gallery").click()
    page.wait_for_selector(f"#gallery-details >> text={saved}", timeout=60_000)
    assert page.get_by_role("tab", name="Gallery").get_attribute("aria-selected") == "true"
    page.locator("#gallery-search input, #gallery-search textarea").first.fill("purple star")
    page.locator("#gallery-search input, #gallery-search textarea").first.press("Enter")
    page.wait_for_selector("#gallery-grid .gallery-item button", timeout=60_000)
    # Thumbnails are the poster (the middle frame); the caption starts with the LoRA's weight and name.
    assert "poster" in page.locator("#gallery-grid .gallery-item img").first.get_attribute("src")
    assert page.locator("#gallery-grid .gallery-item").first.inner_text().strip().startswith("[1× 1-browser-run")
    page.locator("#gallery-grid .gallery-item button").first.click()
    page.wait_for_selector("#gallery-details >> text=seed", timeout=60_000)
    assert saved in page.locator("#gallery-details").inner_text()
    shot(page, "3-gallery")
    widths["Gallery"] = tab_width(page, "Gallery")
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
    # Who holds each CPU slot, and the host's CPU load and RAM over time.
    page.wait_for_selector("#gpus-slots >> text=CPU slot 1 >> visible=true")
    page.wait_for_function("() => document.querySelector('#gpus-history .js-plotly-plot')?.data?.length >= 2")
    shot(page, "4-gpus")
    widths["GPUs"] = tab_width(page, "GPUs")
    # Only the shown tab's timers tick: with every tab's running (before) the page sent 25 events
    # in 8 s at the test's 2 s poll; the GPUs tab's own timer ticks every 4 s.
    events = []

    def count(request) -> None:
        if request.method == "POST" and re.search(r"/run/|/queue/join", request.url):
            events.append(request.url)

    page.on("request", count)
    page.wait_for_timeout(8_000)
    page.remove_listener("request", count)
    assert 1 <= len(events) <= 3, events
    assert len(set(widths.values())) == 1, f"the page width changes between tabs: {widths}"


def phone_train(server, page, toml_file: Path) -> None:
    """390x844, dark theme, while the desktop's run holds the CPU slot: Train does not scroll sideways, the run
    view comes first on it and is in sight after Start; the queued run can be stopped or cancelled
    (with a confirm), then only resumed."""
    page.bring_to_front()
    page.goto(server.url + "?__theme=dark")
    page.wait_for_selector("#train-start")
    assert page.evaluate("() => document.body.classList.contains('dark')")
    assert page.locator("#train-runs").bounding_box()["y"] < page.locator("#train-start").bounding_box()["y"]
    page.locator("input[type=file][accept*='.toml']").set_input_files(str(toml_file))
    page.wait_for_function("() => document.querySelector('#cfg-epochs input')?.value === '5000'")
    page.get_by_label("Run name").fill("browser-phone")
    page.locator("#train-start").scroll_into_view_if_needed()
    page.locator("#train-start").click()
    page.wait_for_selector("#train-job-status >> text=browser-phone")
    wait_in_view(page, "#train-job-status", "#train-job-progress")
    shot(page, "5-phone-dark-after-start", full_page=False)
    wait_controls(page, {"job-stop", "job-cancel"})
    page.locator("#job-cancel").click()
    page.wait_for_selector("#train-job-status >> text=Cancelled before it started", timeout=60_000)
    wait_controls(page, {"job-resume"})
    shot(page, "5-phone-dark-train")
    tab_width(page, "Train")


def phone_gallery_and_infer(server, page) -> None:
    """On the phone, the studio opened again: no tab scrolls sideways (Train: phone_train); the gallery
    shows at once; after Generate the progress is in sight."""
    page.bring_to_front()
    page.goto(server.url + "?__theme=dark")
    page.wait_for_selector("#train-start")
    page.get_by_role("tab", name="GPUs").click()
    page.wait_for_selector("#gpus-host >> text=Host RAM")
    tab_width(page, "GPUs")
    page.get_by_role("tab", name="Gallery").click()
    page.wait_for_selector("#gallery-grid .gallery-item img", timeout=2_500)  # before its timer (6 s here)
    shot(page, "6-phone-dark-gallery")
    tab_width(page, "Gallery")
    page.locator("#gallery-grid .gallery-item button").first.click()
    page.wait_for_selector("#gallery-details >> text=seed")
    page.locator("#gallery-reuse").click()
    page.wait_for_function("() => document.querySelector('#infer-seed input')?.value === '5'", timeout=60_000)
    shot(page, "7-phone-dark-infer-form")
    tab_width(page, "Infer")
    page.locator("#infer-generate").scroll_into_view_if_needed()
    page.locator("#infer-generate").click()
    wait_in_view(page, "#infer-progress")  # the progress, then the video, in sight
    shot(page, "8-phone-dark-infer-generating", full_page=False)
