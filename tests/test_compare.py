"""Compare (studio.compare, tabs/compare.py, `infer --compare`): the grid a comparison expands to, its
all-or-nothing queueing, and one real comparison through the studio's API on the demo model (worker
process, gallery, grid of playable videos)."""
from __future__ import annotations

import re
import time
import urllib.parse
from pathlib import Path

import pytest

from studio.api import StudioApi
from studio.auth import User
from studio.cli.infer import compare_axes
from studio.compare import (MAX_CELLS, CompareAxes, CompareRecord, compare_view, expand_cells, parse_axis,
                            submit_cells)

ALICE, BOB = User("alice"), User("bob")
BASE = {"prompt": "a purple star", "model": "demo", "seed": 7, "num_videos": 3,
        "loras": [{"lora": "upload:style", "weight": 0.5}]}


def test_cells_are_loras_by_weights_and_seeds() -> None:
    cells = expand_cells(BASE, CompareAxes(loras=("job:3/epoch1", "job:3/epoch2"), seeds=(1, 2)))
    assert [(c.row, c.column) for c in cells] == [("#3 epoch1", "seed 1"), ("#3 epoch1", "seed 2"),
                                                  ("#3 epoch2", "seed 1"), ("#3 epoch2", "seed 2")]
    first = cells[0].request
    # The compared LoRA goes first at weight 1; the rest of the stack stays; one video per cell.
    assert first["loras"] == [{"lora": "job:3/epoch1", "weight": 1.0}, {"lora": "upload:style", "weight": 0.5}]
    assert first["seed"] == 1 and first["num_videos"] == 1 and first["prompt"] == "a purple star"
    # Weights vary the stack's first LoRA when no LoRAs are compared; the seed stays the form's.
    by_weight = expand_cells(BASE, CompareAxes(weights=(0, 1)))
    assert [c.column for c in by_weight] == ["weight 0", "weight 1"] and {c.row for c in by_weight} == {"stack"}
    assert [c.request["loras"] for c in by_weight] == [[{"lora": "upload:style", "weight": 0.0}],
                                                       [{"lora": "upload:style", "weight": 1.0}]]
    assert {c.request["seed"] for c in by_weight} == {7}
    # "none" drops the compared LoRA: the base model with the rest of the stack.
    none = expand_cells(BASE, CompareAxes(loras=("none", "upload:style")))
    assert [c.row for c in none] == ["no LoRA", "style"] and none[0].request["loras"] == []
    assert none[1].request["loras"] == [{"lora": "upload:style", "weight": 0.5}]  # keeps its stack weight
    # A random seed is drawn once: every cell starts from the same noise.
    draws = iter([41, 42])
    random = expand_cells({**BASE, "seed": -1}, CompareAxes(weights=(0, 1)), seed_if_random=lambda: next(draws))
    assert {c.request["seed"] for c in random} == {41}


def test_a_comparison_is_bounded_and_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_CELLS}"):
        expand_cells(BASE, CompareAxes(loras=tuple(f"job:1/epoch{n}" for n in range(5)), seeds=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="at least two"):
        expand_cells(BASE, CompareAxes(seeds=(1,)))
    with pytest.raises(ValueError, match="put one in the stack"):
        expand_cells({**BASE, "loras": []}, CompareAxes(weights=(0, 1)))
    with pytest.raises(ValueError, match="no weight to vary"):
        expand_cells(BASE, CompareAxes(loras=("none", "upload:style"), weights=(0, 1)))
    assert parse_axis("0, 0.5; 1", float, "weights") == [0.0, 0.5, 1.0] and parse_axis("", int, "seeds") == []
    assert parse_axis([3, "4"], int, "seeds") == [3, 4]
    with pytest.raises(ValueError, match="seeds: 'x' is not a whole number"):
        parse_axis("1, x", int, "seeds")
    assert CompareAxes(seeds=(1, 1, 2)).seeds == (1, 2)  # a repeated choice is one column


def test_a_refused_cell_takes_the_queued_ones_back_out() -> None:
    queued, cancelled = [], []

    def submit(request: dict) -> str:
        if request["seed"] == 3:
            raise ValueError("seed 3 refused")
        queued.append(f"r{request['seed']}")
        return queued[-1]

    with pytest.raises(ValueError, match="seed 3 refused"):
        submit_cells([{"seed": 1}, {"seed": 2}, {"seed": 3}], submit, cancelled.append)
    assert cancelled == ["r1", "r2"]
    assert submit_cells([{"seed": 1}], submit, cancelled.append) == ["r1"]


def test_the_state_of_a_comparison_comes_from_its_cells() -> None:
    record = CompareRecord("c1", "alice", 0.0, "p", ["a"], ["seed 1", "seed 2"],
                           [{"row": "a", "column": "seed 1", "request_id": "r1"},
                            {"row": "a", "column": "seed 2", "request_id": "r2"}])

    def view(states: dict[str, str]) -> dict:
        return compare_view(record, lambda rid: {"state": states[rid], "step": 2, "total_steps": 4,
                                                 "gallery_ids": ["g"] if states[rid] == "succeeded" else []})

    assert view({"r1": "succeeded", "r2": "queued"})["state"] == "queued"
    assert view({"r1": "running", "r2": "queued"})["state"] == "running"
    done = view({"r1": "succeeded", "r2": "succeeded"})
    assert done["state"] == "succeeded" and done["done"] == 2 and done["step"] == 4 and done["total_steps"] == 8
    assert view({"r1": "succeeded", "r2": "failed"})["state"] == "finished with errors"
    assert compare_view(record, lambda rid: (_ for _ in ()).throw(KeyError(rid)))["cells"][0]["state"] == "lost"


def test_cli_compare_axes(tmp_path: Path) -> None:
    from engine.rundir import LORA_FILE

    for label in ("epoch1", "epoch2"):
        (tmp_path / "run" / label).mkdir(parents=True)
        (tmp_path / "run" / label / LORA_FILE).write_bytes(b"x")
    axes = compare_axes([f"lora={tmp_path / 'run'}/*,none", "weights=0,1", "seed=5"])
    assert [Path(p).parent.name for p in axes.loras[:2]] == ["epoch1", "epoch2"] and axes.loras[2] == "none"
    assert axes.weights == (0.0, 1.0) and axes.seeds == (5,)
    with pytest.raises(ValueError, match="lora=..., weight=... or seed="):
        compare_axes(["steps=1,2"])
    with pytest.raises(ValueError, match="no saved LoRA"):
        compare_axes([f"lora={tmp_path}/*"])


@pytest.mark.slow
def test_a_comparison_runs_whole_and_lands_in_the_gallery(api: StudioApi, tmp_path: Path) -> None:
    """Weights 0 and 1 of an uploaded LoRA on the demo model, through the API and the tab's handlers:
    the weight shows in the pixels, every video is a gallery item with the comparison's id (seeds as
    columns: the CLI test)."""
    from engine.inference.random_lora import random_lora
    from engine.models import resolve_model
    from tabs import compare as tab

    lora = random_lora(resolve_model("demo"), tmp_path / "style", seed=1, scale=1.0)
    ref = api.upload_lora(ALICE, lora)
    form = {"prompt": "a purple star", "model": "demo", "width": 32, "height": 32, "num_frames": 5, "steps": 2,
            "fps": 8, "seed": 11, "loras": [{"lora": ref, "weight": 1.0}]}
    with pytest.raises(Exception, match="upload:missing: no such uploaded LoRA"):
        api.compare(ALICE, form, ["none", "upload:missing"], [], [])
    (taken_back,) = api.list_generations(ALICE)  # the "none" cell was queued, then taken out again
    assert api.ctx.inference.wait(taken_back["id"], 60)["state"] == "cancelled"
    compare_id, note = tab.start_compare(api, ALICE, form, [], "0, 1", "")
    assert "2 videos (1 x 2)" in note
    deadline = time.time() + 240
    while (view := tab.compare_view(api, ALICE, compare_id)) and not view.final:
        assert time.time() < deadline, view.bar
        time.sleep(0.5)
    status = api.compare_status(ALICE, compare_id)
    assert status["state"] == "succeeded", status
    cells = {c["column"]: c for c in status["cells"]}
    assert list(cells) == ["weight 0", "weight 1"]
    items = {column: api.gallery_item(ALICE, c["gallery_ids"][0]) for column, c in cells.items()}
    assert {item["params"]["compare_id"] for item in items.values()} == {compare_id}
    assert {item["seed"] for item in items.values()} == {11} and items["weight 1"]["loras"][0]["weight"] == 1.0
    assert items["weight 0"]["digest"] != items["weight 1"]["digest"]  # the weight shows in the pixels
    # The grid: a labelled row x columns table of videos served through expiring links.
    grid = view.grid or tab.compare_view(api, ALICE, compare_id).grid
    assert grid.count("<video src='gradio_api/file=") == 2 and "<th>weight 0</th>" in grid
    for src in re.findall(r"<video src='gradio_api/file=([^']+)'", grid):
        assert Path(urllib.parse.unquote(src)).parent.parent == api.ctx.layout.served_dir
    with pytest.raises(Exception, match="not found"):
        api.compare_status(BOB, compare_id)
    assert "not found" in tab.compare_view(api, BOB, compare_id).bar


@pytest.mark.slow
def test_cli_compare_runs_the_grid_and_the_studio_shows_it(studio_home: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from studio.cli import main
    from studio.context import StudioContext
    from studio.settings import StudioSettings

    argv = ["--home", str(studio_home), "infer", "--model", "demo", "--prompt", "a purple star", "--width", "32",
            "--height", "32", "--frames", "5", "--steps", "2", "--fps", "8", "--owner", "alice",
            "--compare", "seed=3,4", "--json"]
    assert main([*argv[:-3], "--compare", "seed=3", "--compare", "weight=0,1"]) == 2  # weights, but no LoRA
    assert "put one in the stack" in capsys.readouterr().err
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(c["column"], c["state"]) for c in result["cells"]] == [("seed 3", "succeeded"), ("seed 4", "succeeded")]
    assert all(Path(c["videos"][0]).is_file() for c in result["cells"])
    assert Path(result["cells"][0]["videos"][0]).read_bytes() != Path(result["cells"][1]["videos"][0]).read_bytes()
    ctx = StudioContext.create(StudioSettings(home=studio_home).validate(), start=False)
    try:
        status = StudioApi(ctx).compare_status(ALICE, result["compare_id"])
        assert status["state"] == "succeeded" and status["columns"] == ["seed 3", "seed 4"]
        item = StudioApi(ctx).gallery_item(ALICE, status["cells"][0]["gallery_ids"][0])
        assert item["params"]["compare_id"] == result["compare_id"] and item["seed"] == 3
    finally:
        ctx.close()


def test_the_rows_to_pick_include_every_save_of_a_run(api: StudioApi) -> None:
    from engine.rundir import LORA_FILE
    from studio.presets import DEMO_PRESET
    from tabs import compare as tab
    from tabs import train
    from tests.ui_support import write_dataset

    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(write_dataset(api.ctx.layout.home))
    job = train.start_run(api, ALICE, cfg, [], 1, "saves")
    run_dir = Path(api.ctx.scheduler.get(job["id"]).run_dir)
    for label in ("epoch1", "epoch2"):
        (run_dir / label).mkdir(parents=True)
        (run_dir / label / LORA_FILE).write_bytes(b"not read here")
    choices = tab.compare_lora_choices(api, ALICE)
    assert choices[:2] == [("none · the base model", "none"), (f"#{job['id']} saves · every save", f"job:{job['id']}/*")]
    assert (f"#{job['id']} saves · epoch2", f"job:{job['id']}/epoch2") in choices
    assert tab.compare_lora_choices(api, BOB) == [("none · the base model", "none")]  # not bob's run
    assert api._every_save(ALICE, [f"job:{job['id']}/*", "none"]) == [f"job:{job['id']}/epoch1",
                                                                     f"job:{job['id']}/epoch2", "none"]
    with pytest.raises(Exception, match="not found"):
        api._every_save(BOB, [f"job:{job['id']}/*"])
