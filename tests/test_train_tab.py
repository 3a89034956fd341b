"""The Train tab's handlers without a browser: (api, user, inputs) -> outputs on a real studio context
(SQLite, data directory, dataset files); the browser test drives the same functions through Gradio."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from engine.config import TrainConfig
from studio.api import StudioApi
from studio.auth import User
from studio.presets import DEMO_PRESET
from studio.widgets import ConfigForm
from tabs import runs, train
from tests.ui_support import write_dataset

ALICE, BOB, ROOT = User("alice"), User("bob"), User("root", is_admin=True)


@pytest.fixture
def form(api: StudioApi) -> train.TrainForm:
    with gr.Blocks():
        config_form = ConfigForm.build(TrainConfig(output_dir="x"))
        folder, repeats = gr.Dropdown(allow_custom_value=True), gr.Number()
        loaded = gr.State("")
    return train.TrainForm(config_form, folder, repeats, api.ctx.layout.runs_dir, loaded)


def test_form_renders_the_config_and_names_a_bad_value(api: StudioApi, form: train.TrainForm) -> None:
    dataset = write_dataset(api.ctx.layout.home)
    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(dataset)
    values = form.updates(cfg)
    text, note = train.render_toml(form, values)
    assert note == "" and TrainConfig.from_toml_string(text).dataset.directory[0].path == str(dataset)
    values[form.form.components["optimizer.lr"]] = 0
    text, note = train.render_toml(form, values)
    assert text is not None and "optimizer.lr: must be &gt; 0" in note  # HTML-escaped in the note


def test_what_the_form_does_not_show_goes_into_the_run_as_loaded(api: StudioApi, form: train.TrainForm) -> None:
    """The demo preset's [sample] table, a second dataset folder with its own buckets and an eval set
    are TOML-only: editing the form keeps them; a fresh form has none."""
    dataset = write_dataset(api.ctx.layout.home)
    cfg = train.preset_config(api, DEMO_PRESET)
    assert cfg.sample is not None and cfg.sample.prompts
    cfg.dataset.directory = [cfg.dataset.directory[0].model_copy(update={"path": str(dataset)}),
                             cfg.dataset.directory[0].model_copy(update={"path": str(dataset), "frame_buckets": [1]})]
    values = form.updates(cfg)
    values[form.form.components["optimizer.lr"]] = 5e-4  # the user edits the form
    values[form.repeats] = 2  # not the preset's own, so the second folder shows whether it was kept
    assert cfg.dataset.directory[1].num_repeats != 2
    edited = form.config(values)
    assert edited.sample == cfg.sample and edited.optimizer.lr == 5e-4
    assert [d.num_repeats for d in edited.dataset.directory] == [2, cfg.dataset.directory[1].num_repeats]
    assert edited.dataset.directory[1].frame_buckets == [1]
    values[form.loaded] = ""
    assert form.config(values).sample is None


def test_check_dataset_lists_files_and_problems(api: StudioApi) -> None:
    dataset = write_dataset(api.ctx.layout.home, count=3)
    (dataset / "orphan.txt").write_text("a caption without a video")
    found = train.check_dataset(api, ALICE, str(dataset), "1, 17")
    assert "files in shapes" in found.note and len(found.rows) >= 3
    assert {row[1] for row in found.rows} >= {"video"}
    with pytest.raises(Exception, match="outside|allowed"):
        train.check_dataset(api, ALICE, "/etc", "17")
    with pytest.raises(Exception, match="outside"):  # the studio's shared datasets are read-only to users
        train.write_captions(api, ALICE, str(dataset), [[found.rows[0][0], "new caption"]])
    assert "saved 3 captions" in train.write_captions(api, ROOT, str(dataset), [[r[0], "new caption"] for r in found.rows[:3]])


def test_start_list_panel_and_control_a_run(api: StudioApi, form: train.TrainForm) -> None:
    dataset = write_dataset(api.ctx.layout.home)
    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(dataset)
    job = train.start_run(api, ALICE, cfg, [], 1, "my run")
    assert job["status"] == "queued" and job["name"] == "my run"
    rows, choices, pick = runs.job_list(api, ALICE, current=None)
    assert pick == job["id"] and rows[0][:4] == [job["id"], "my run", "alice", "queued"]
    assert runs.job_list(api, BOB, current=job["id"])[2] is None  # not bob's
    panel = runs.job_panel(api, ALICE, job["id"], last_files="")
    assert f"#{job['id']} my run" in panel.header and panel.files == []
    assert "cancel" in panel.actions and not {"resume", "save"} & set(panel.actions)  # the others greyed out
    again = runs.job_panel(api, ALICE, job["id"], panel.files_sig)
    assert again.files is None  # unchanged: the UI skips redrawing
    # Samples of a save and the best save, as the trainer records them (the grid: tests/test_run_charts.py).
    run_dir = Path(api.ctx.scheduler.get(job["id"]).run_dir)
    write_sample_event(run_dir, "epoch1", step=4, scores={"all": 1.0, "color": 1.0})
    shown = runs.job_panel(api, ALICE, job["id"], again.files_sig)
    assert "best save: <b>epoch1</b>" in shown.header and "highest sample scores" in shown.header
    with pytest.raises(FileNotFoundError):
        api.job_sample_file(ALICE, job["id"], "../run.toml")
    # The same through /job_samples and `python -m studio jobs samples`.
    from studio.cli.jobs import format_samples

    listed = api.job_samples(ALICE, job["id"])
    assert listed["best"]["label"] == "epoch1" and listed["samples"][0]["videos"][0]["file"] == "samples/epoch1/0.mp4"
    with pytest.raises(Exception, match="not found"):
        api.job_samples(BOB, job["id"])
    text = format_samples({"samples": listed["samples"], "best": listed["best"]}, run_dir)
    assert text.splitlines()[0].startswith("epoch1 (step 4") and str(run_dir / "samples/epoch1/0.mp4") in text
    assert "best save: epoch1" in text and "no samples yet" in format_samples({}, run_dir)
    with pytest.raises(ValueError, match="select a run"):
        runs.control_job(api, ALICE, None, "stop")
    with pytest.raises(Exception, match="not found"):
        runs.control_job(api, BOB, job["id"], "cancel")
    assert "cancel requested (stopped)" in runs.control_job(api, ALICE, job["id"], "cancel")


def test_gpu_picker_on_a_machine_without_gpus(api: StudioApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    choices, label = train.gpu_choices(api, ALICE)
    assert choices == [] and label.startswith("No GPU on this machine")


def test_import_and_export(api: StudioApi, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose files"):
        train.import_dataset(api, ALICE, [], "x")
    clip = write_dataset(tmp_path / "elsewhere", count=1)
    files = [str(p) for p in sorted(clip.iterdir())]
    dest, note = train.import_dataset(api, ALICE, files, "my data")
    assert dest.is_dir() and "alice" in str(dest) and f"imported {len(files)} files" in note
    exported = Path(train.export_toml('epochs = 1\n'))
    assert exported.read_text() == "epochs = 1\n" and exported.suffix == ".toml"


def test_infer_form_values_become_a_request() -> None:
    from engine.inference.request import InferRequest
    from tabs.infer import form_request

    req = form_request({"model": "demo", "prompt": "p", "seed": -1, "flow_shift": 0, "width": 64.0,
                        "height": 48.0, "num_frames": 9.0, "fps": 16.0, "steps": 3.0, "num_videos": 1.0,
                        "guidance_scale": 5.0, "negative_prompt": "", "fuse_loras": False})
    assert req["seed"] is None and req["flow_shift"] is None and req["width"] == 64 and isinstance(req["steps"], int)
    built = InferRequest.from_dict(req).validate()
    assert built.flow_shift is None and (built.width, built.height, built.num_frames) == (64, 48, 9)
    assert form_request({"seed": 7, "flow_shift": 2.5})["flow_shift"] == 2.5


def test_infer_result_panel_and_cancel(api: StudioApi) -> None:
    from tabs import infer

    missing = infer.generation_view(api, ALICE, "nope")
    assert missing.final and "request not found" in missing.bar and missing.item_id is None
    assert "nothing to cancel" in infer.cancel_generation(api, ALICE, None)
    with pytest.raises(Exception, match="not found"):
        infer.cancel_generation(api, ALICE, "nope")
    with pytest.raises(Exception, match="safetensors|LoRA|not"):
        infer.stack_with_upload(api, ALICE, __file__, [])  # not a LoRA file: refused, nothing stored


def test_generate_names_a_bad_seed_instead_of_crashing(api: StudioApi) -> None:
    from engine.config import ConfigError

    for seed in ("abc", 1.5, -3):
        with pytest.raises(ConfigError, match="seed") as err:
            api.generate(ALICE, {"prompt": "a star", "model": "demo", "seed": seed})
        assert err.value.paths == ["seed"]


def test_start_refuses_a_dataset_with_nothing_trainable_before_queueing(api: StudioApi) -> None:
    from engine.dataset import DatasetError
    from tests.trainer_support import write_video

    folder = api.ctx.layout.home / "datasets" / "short"
    folder.mkdir(parents=True)
    write_video(folder / "blink.mp4", frames=5)
    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(folder)
    with pytest.raises(DatasetError, match="no trainable item, 1 media files .*5 frames, shorter than every video"):
        train.start_run(api, ALICE, cfg, [], 1, "short")
    assert api.list_jobs(ALICE) == []
    found = train.check_dataset(api, ALICE, str(folder), "1, 17")
    assert "nothing trainable: Start will refuse" in found.note and found.rows[0][4].startswith("skipped: 5 frames")
    preview = api.check_dataset(ALICE, config_toml=cfg.to_toml())  # the /check_dataset endpoint's action
    assert preview["trainable"] is False and preview["files"][0]["skipped"].startswith("5 frames")


def write_sample_event(run_dir: Path, label: str, step: int, scores: dict[str, float]) -> None:
    import json

    from PIL import Image

    folder = run_dir / "samples" / label
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 40, 200)).save(folder / "0.png")
    (folder / "0.mp4").write_bytes(b"not decoded here " + label.encode())
    video = {"prompt": "a purple star", "seed": 0, "file": str(folder / "0.mp4"), "scores": scores}
    with (run_dir / "metrics.jsonl").open("a") as out:
        out.write(json.dumps({"event": "save", "step": step, "epoch": 1, "label": label}) + "\n")
        out.write(json.dumps({"event": "sample", "step": step, "label": label, "scores": scores,
                              "videos": [video]}) + "\n")


def test_progress_words_name_epoch_speed_elapsed_and_total() -> None:
    running = {"step": 40, "total_steps": 100, "status": "running", "terminal": False, "eta_s": 90.0,
               "last_loss": 0.123456, "phase": "training"}
    series = {"epochs": 10, "pace": {"step": 40, "epoch": 4, "elapsed_s": 60.0}}
    assert runs.pace_text(running, series) == \
        "step 40/100 · epoch 4/10 · 1.50 s/step · elapsed 1m00s · ETA 1m30s of ~2m30s · loss 0.1235"
    ended = {**running, "status": "stopped", "terminal": True, "last_loss": None}
    assert runs.pace_text(ended, series).endswith("took 1m00s")
    queued = {"step": None, "total_steps": None, "status": "queued", "terminal": False, "phase": None}
    assert runs.pace_text(queued, {}) == "queued"


def test_save_toml_file_follows_the_text() -> None:
    first, again = Path(train.export_toml("epochs = 1\n")), Path(train.export_toml("epochs = 1\n"))
    changed = Path(train.export_toml("epochs = 2\n"))
    assert first == again and changed != first and changed.read_text() == "epochs = 2\n"
    assert first.read_text() == "epochs = 1\n"  # an earlier download link still serves its own text


def test_infer_timings_table_and_lora_picks(api: StudioApi) -> None:
    from studio.widgets import timings_table
    from tabs import infer

    table = timings_table({"load_s": 0.33872378899832256, "denoise_s": 1.5, "videos": [{"load_s": 0.3}], "note": 1})
    assert "<th>load</th><td>0.34 s</td>" in table and "<th>total</th><td>1.84 s</td>" in table
    assert "videos" not in table and "note" not in table and timings_table(None) == ""
    with pytest.raises(ValueError, match=r"LoRA 2: 'my lora' is not one of your saved or uploaded LoRAs") as err:
        infer.check_lora_picks(api, ALICE, [{"lora": "job:9/epoch1", "weight": 1.0}, {"lora": "my lora", "weight": 1}])
    assert "epochN" not in str(err.value)
    infer.check_lora_picks(api, ALICE, [])  # no LoRA: nothing to check
