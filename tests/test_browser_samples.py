"""In headless chromium: a demo-model run with a tiny [sample] table; the samples grid shows a video
of the first save while the run is still training, the video plays in place, the score curve and the
loss chart's save markers appear, and the log-scale control redraws the chart. Then the Infer tab's
Compare renders the form's prompt over two seeds as a labelled grid of playing videos."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_browser_studio import LONG, page, shot  # noqa: F401 - the shared chromium page fixture
from tests.ui_support import start_server, stop_server, train_toml

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.heavy]


def sampled_run_toml(dataset: Path) -> str:
    """The demo model, one step per epoch, a save per epoch and one tiny sample (64x64x5, 2 steps) every second; long
    enough that the run is still training when the first sample shows."""
    return train_toml("demo", dataset, epochs=400, frame_buckets="[17]", head="micro_batch_size_per_gpu = 4\n",
                      tail=SAMPLE_TABLE)


SAMPLE_TABLE = """[sample]
prompts = ["a purple star moving right on a white background"]
seeds = [0]
width = 64
height = 64
num_frames = 5
steps = 2
every_n_epochs = 2
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("browser_samples"), free_port(), auth=False)
    yield srv
    stop_server(srv)


def test_a_sample_appears_and_plays_during_the_run(server, page, tmp_path: Path) -> None:  # noqa: F811
    try:
        watch(server, page, tmp_path)
    except Exception:
        shot(page, "samples-failure")
        raise


def watch(server, page, tmp_path: Path) -> None:
    page.goto(server.url)
    page.wait_for_selector("#train-start")
    toml_file = tmp_path / "sampled.toml"
    toml_file.write_text(sampled_run_toml(server.dataset))
    page.locator("input[type=file][accept*='.toml']").set_input_files(str(toml_file))
    page.wait_for_function("(p) => document.querySelector('#train-folder input')?.value === p",
                           arg=str(server.dataset))
    page.get_by_label("Run name").fill("sampled-run")
    page.locator("#train-start").click()
    page.wait_for_selector("text=queued run #")
    # The grid gains a row for the first sampled save; its video plays where it is.
    page.wait_for_selector("#train-samples video", timeout=LONG)
    assert page.locator("#train-job-status .status-badge").inner_text().strip().lower() == "running"
    assert "epoch2" in page.locator("#train-samples th.sample-save").first.inner_text()
    page.wait_for_function("() => document.querySelector('#train-samples video').readyState >= 2", timeout=60_000)
    page.evaluate("() => document.querySelector('#train-samples video').play()")
    page.wait_for_function("() => document.querySelector('#train-samples video').currentTime > 0", timeout=30_000)
    # The demo model is scored: the curve under the loss chart has the save's scores; saves are marked.
    page.wait_for_function("""() => { const q = document.querySelector('#train-quality .js-plotly-plot');
        return q && q.data && q.data.some(t => t.name === 'all' && t.x.length >= 1); }""", timeout=60_000)
    assert page.evaluate("""() => document.querySelector('#train-loss .js-plotly-plot').data
        .some(t => t.name === 'saves' && t.x.length >= 2)""")
    # The run view names the best save and why (its scores).
    page.wait_for_selector("#train-job-status >> text=best save:", timeout=30_000)
    assert "highest sample scores" in page.locator("#train-job-status .best-save").inner_text()
    page.locator("#chart-log input").check()
    page.wait_for_function("() => document.querySelector('#train-loss .js-plotly-plot').layout.yaxis.type === 'log'",
                           timeout=30_000)
    shot(page, "samples-grid")
    page.locator("#job-stop").click()
    page.wait_for_selector("#train-job-status .status-badge:text('stopped')", timeout=LONG)
    compare_two_seeds(page)


def compare_two_seeds(page) -> None:
    page.get_by_role("tab", name="Infer").click()
    page.locator("#infer-prompt textarea").fill("a purple star moving right on a white background")
    page.locator("#infer-steps input[type=number]").fill("2")
    page.locator("#infer-steps input[type=number]").press("Enter")
    page.get_by_text("Compare: this prompt and seed").click()  # the section opens
    page.locator("#compare-seeds textarea, #compare-seeds input").first.fill("1, 2")
    page.locator("#compare-start").click()
    page.wait_for_selector("#compare-msg >> text=2 videos (1 x 2)", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#compare-grid video').length === 2", timeout=LONG)
    header = page.locator("#compare-grid thead").inner_text()
    assert "seed 1" in header and "seed 2" in header
    page.wait_for_function("() => [...document.querySelectorAll('#compare-grid video')].every(v => v.readyState >= 2)",
                           timeout=60_000)
    assert "compare_id" in page.locator("#compare-grid").inner_text()
    shot(page, "compare-grid")
