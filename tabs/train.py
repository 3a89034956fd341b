"""The Train tab: dataset, config form (by key path), presets, TOML, GPU picker, jobs and live charts."""
from __future__ import annotations

import hashlib
import html
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from engine.config import ConfigError, DatasetConfig, DirectoryConfig, TrainConfig
from studio import datasets as ds
from studio.api import StudioApi
from studio.auth import User
from studio.context import StudioContext
from studio.http_api import request_user, user_errors
from studio.presets import DEMO_PRESET, PRESET_NAMES, load_preset
from studio.widgets import ConfigForm, message, progress_bar, scroll_into_sight, scroll_to_end
from tabs import run_charts
from tabs.runs import CONTROLS, JOB_COLUMNS, control_job, job_list, job_panel
from tabs.timers import TabTimers

TAB_ID = "train"
FILE_COLUMNS = ["file", "kind", "frames", "size", "bucket", "caption"]
NOT_CONFIRMED = -1  # what the Cancel button's confirm dialog hands the handler when the user says no


@dataclass
class TrainForm:
    """The config form plus the dataset folder and repeats: values <-> TrainConfig. `loaded` holds the
    TOML of the last preset or file, so what the form does not show ([sample], eval datasets, more
    dataset folders, per-folder overrides) goes into the run as loaded."""

    form: ConfigForm
    folder: gr.components.Component
    repeats: gr.components.Component
    runs_dir: Path
    loaded: gr.components.Component  # gr.State: TOML text, "" before any preset or file

    @property
    def inputs(self) -> set[gr.components.Component]:
        return self.form.inputs | {self.folder, self.repeats, self.loaded}

    def config(self, values: dict) -> TrainConfig:
        loaded = values.get(self.loaded) or ""
        base = TrainConfig.from_toml_string(loaded) if loaded else TrainConfig(output_dir=str(self.runs_dir))
        cfg = self.form.to_config(values, base)
        folder, repeats = (values.get(self.folder) or "").strip(), int(values.get(self.repeats) or 1)
        first = base.dataset.directory[0] if base.dataset.directory else DirectoryConfig(path=folder)
        cfg.dataset.directory = ([first.model_copy(update={"path": folder, "num_repeats": repeats}),
                                  *base.dataset.directory[1:]] if folder else [])
        return cfg

    def updates(self, cfg: TrainConfig) -> dict[gr.components.Component, Any]:
        directory = cfg.dataset.directory[0] if cfg.dataset.directory else None
        updates = self.form.updates(cfg)
        # A config without a dataset keeps the folder already chosen.
        updates[self.folder] = directory.path if directory else gr.skip()
        updates[self.repeats] = directory.num_repeats if directory else gr.skip()
        updates[self.loaded] = cfg.to_toml()
        return updates


# ---- handlers: (api, user, inputs) -> outputs, unit-tested in tests/test_train_tab.py -------------
def render_toml(form: TrainForm, values: dict) -> tuple[str | None, str]:
    """(TOML of the form, or None when the form cannot make a config; an error note or "")."""
    try:
        cfg = form.config(values)
    except ConfigError as exc:
        return None, message(str(exc), "error")
    try:
        cfg.validate()
        return cfg.to_toml(), ""
    except ConfigError as exc:
        return cfg.to_toml(), message(str(exc), "error")


def preset_config(api: StudioApi, name: str) -> TrainConfig:
    return load_preset(name, api.ctx.layout.runs_dir, api.ctx.layout.home)


def export_toml(text: str) -> str:
    """The Save TOML button's file for this text. It is renewed with every change of the preview, so
    one click downloads the config as it is now (a button that made the file on click handed out the
    previous click's file). One folder per content: the same text is written once."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "studio-toml" / digest / "train.toml"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return str(target)


@dataclass
class DatasetCheck:
    note: str  # HTML: summary and problems
    thumbnails: list[tuple[str, str]]
    rows: list[list[Any]]


def check_dataset(api: StudioApi, user: User, folder_text: str, buckets_text: str) -> DatasetCheck:
    """The preview the trainer follows (engine.dataset): each file's bucket or why it is skipped."""
    ctx = api.ctx
    path = ds.confine(folder_text, api.dataset_roots(user))
    dataset = DatasetConfig(directory=[DirectoryConfig(path=str(path))])
    buckets = [int(b) for b in str(buckets_text).replace(" ", "").split(",") if b]
    if buckets:
        dataset.frame_buckets = buckets
    found = ds.check(dataset)
    counts = ", ".join(f"{b}: {n}" for b, n in found["bucket_counts"].items())
    summary = (f"{len(found['files'])} files in {path.name}: {found['samples']} samples, "
               f"{found['steps_per_epoch']} steps per epoch on one GPU" + (f" ({counts})" if counts else ""))
    if not found["trainable"]:
        summary += " -- nothing trainable: Start will refuse this dataset"
    note = message(summary, "ok" if found["trainable"] and not found["warnings"] else "error")
    if found["warnings"]:
        note += "<ul class='problems'>" + "".join(f"<li>{html.escape(w)}</li>" for w in found["warnings"][:50]) + "</ul>"
    rows = [[f["file"], f["kind"], f["frames"] if f["frames"] is not None else "?", f["size"],
             f"skipped: {f['skipped']}" if f["skipped"] else ", ".join(f["buckets"]), f["caption"]]
            for f in found["files"]]
    shots = [(api.file_link(t), f["file"]) for f in found["files"][:64]
             if (t := ds.thumbnail(path / f["file"], ctx.layout.cache_dir / "thumbs")) is not None]
    return DatasetCheck(note, shots, rows)


def write_captions(api: StudioApi, user: User, folder_text: str, table: Any) -> str:
    path = ds.confine(folder_text, api.writable_dataset_roots(user))  # shared roots are read-only
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    for row in rows:
        ds.save_caption(path, str(row[0]), str(row[-1] or ""))
    return message(f"saved {len(rows)} captions", "ok")


def import_dataset(api: StudioApi, user: User, paths: list[str] | None, name: str) -> tuple[Path, str]:
    """Uploaded files into a new dataset folder of the user's: (folder, note)."""
    if not paths:
        raise ValueError("choose files to upload first")
    dest = api.user_uploads(user) / "datasets" / ds.safe_name(name or time.strftime("upload-%Y%m%d-%H%M%S"))
    written = ds.import_uploads(paths, dest, api.ctx.settings.max_upload_mb * 2**20)
    return dest, message(f"imported {len(written)} files into {dest.name}", "ok")


def start_run(api: StudioApi, user: User, cfg: TrainConfig, gpus: list[str] | None, count: Any,
              name: str | None) -> dict[str, Any]:
    """Queue the form's config (not the TOML preview, whose change events may still be in flight)."""
    return api.start_training(user, cfg.to_toml(), ",".join(gpus or []), int(count or 1), name or "")


def plan_note(api: StudioApi, user: User, cfg: TrainConfig, gpus: list[str] | None, count: Any) -> str:
    """HTML: whether the form's config fits the GPUs Start would use, its time, and what would make it fit."""
    plan = api.plan_training(user, cfg.to_toml(), ",".join(gpus or []), int(count or 1))
    lines = [html.escape(line) for line in plan["summary"]]
    return message(lines[0], "ok" if plan["fits"] else "error") + "".join(f"<div>{line}</div>" for line in lines[1:])


def gpu_choices(api: StudioApi, user: User) -> tuple[list[tuple[str, str]], str]:
    """(the GPU picker's choices, its label)."""
    status = api.gpu_status(user)
    choices = [(f"GPU {g['index']} · {g['name']} · "
                + (f"busy: {g['job']}" if g["job"] else
                   f"free {((g['memory_total_mib'] or 0) - (g['memory_used_mib'] or 0)) / 1024:.0f} GiB"),
                str(g["index"])) for g in status["gpus"]]
    label = "GPUs (none ticked: any free)" if choices else "No GPU on this machine: runs use a CPU slot"
    return choices, label


def build(ctx: StudioContext, api: StudioApi, timers: TabTimers) -> None:
    roots = ctx.settings.shared_dataset_roots  # the page as built: no user's uploads (filled per user on focus)
    try:
        start_cfg = load_preset(DEMO_PRESET, ctx.layout.runs_dir, ctx.layout.home)
    except ConfigError:
        start_cfg = TrainConfig(output_dir=str(ctx.layout.runs_dir))
    start_dir = start_cfg.dataset.directory[0] if start_cfg.dataset.directory else None

    with gr.Row(equal_height=False):
        # ---------------------------------------------------------------- new run
        with gr.Column(scale=5, elem_classes=["panel"]):
            gr.Markdown("### New training run")
            with gr.Row(equal_height=False):
                preset = gr.Dropdown(list(PRESET_NAMES), value=DEMO_PRESET, label="Preset", scale=3,
                                     elem_id="train-preset")
                with gr.Column(scale=1, min_width=130):
                    load_toml = gr.UploadButton("Load TOML", file_types=[".toml"], size="sm")
                    save_toml = gr.DownloadButton("Save TOML", export_toml(start_cfg.to_toml()), size="sm",
                                                  elem_id="train-save-toml")
            with gr.Accordion("Dataset", open=True, elem_classes=["form-section"]):
                with gr.Row(equal_height=True):
                    folder = gr.Dropdown(ds.list_dataset_folders(roots), value=start_dir.path if start_dir else None,
                                         allow_custom_value=True, label="Dataset folder", scale=4,
                                         info="a folder under the allowed dataset roots", elem_id="train-folder")
                    repeats = gr.Number(start_dir.num_repeats if start_dir else 1, precision=0,
                                        label="num repeats", scale=1, min_width=100)
                with gr.Row(equal_height=True):
                    uploads = gr.File(file_count="multiple", label="…or upload images/videos/captions or a .zip",
                                      file_types=[*sorted(ds.MEDIA_EXTS), ".txt", ".zip"], scale=4, height=150)
                    with gr.Column(scale=1, min_width=140):
                        upload_name = gr.Textbox(label="new dataset name", placeholder="my-dataset")
                        upload_btn = gr.Button("Import", size="sm")
                check_btn = gr.Button("Check dataset", size="sm", elem_id="train-check")
                check_msg = gr.HTML()
                thumbs = gr.Gallery(label="Files", columns=8, height=180, visible=False, allow_preview=False)
                files = gr.Dataframe(headers=FILE_COLUMNS, interactive=True, visible=False, wrap=True,
                                     column_widths=["22%", "8%", "8%", "10%", "8%", "44%"])
                save_captions = gr.Button("Save captions", size="sm", visible=False)
            form = ConfigForm.build(start_cfg)
            with gr.Accordion("TOML preview", open=False):
                toml_view = gr.Code(start_cfg.to_toml(), language=None, interactive=False, elem_id="train-toml")
            form_msg = gr.HTML()
            with gr.Row(equal_height=True):
                gpu_pick = gr.CheckboxGroup([], label="GPUs (none ticked: any free)", scale=3, elem_id="train-gpus")
                num_gpus = gr.Number(1, precision=0, label="how many", minimum=1, scale=1, min_width=90)
            with gr.Row(equal_height=True):
                run_name = gr.Textbox(label="Run name", placeholder="optional", scale=3)
                plan_btn = gr.Button("Will it fit?", scale=1, elem_id="train-plan")
                start = gr.Button("Start training", variant="primary", scale=2, elem_id="train-start")
            plan_msg = gr.HTML(elem_id="train-plan-msg")
            start_msg = gr.HTML()

        # ---------------------------------------------------------------- runs
        # First on phones (assets/studio.css); Start scrolls to it.
        with gr.Column(scale=6, elem_classes=["panel"], elem_id="train-runs"):
            gr.Markdown("### Runs")
            jobs_table = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, max_height=260, elem_id="train-jobs")
            job_pick = gr.Dropdown([], label="Selected run", elem_id="train-job-pick")
            job_header = gr.HTML(elem_id="train-job-status")
            job_progress = gr.HTML(progress_bar(None, ""), elem_id="train-job-progress")
            charts = run_charts.build_chart()
            with gr.Row():
                stop_btn = gr.Button("Stop", size="sm", min_width=80, elem_id="job-stop")
                save_btn = gr.Button("Save now", size="sm", min_width=80, elem_id="job-save")
                resume_btn = gr.Button("Resume", size="sm", min_width=80, elem_id="job-resume")
                cancel_btn = gr.Button("Cancel", size="sm", min_width=80, variant="stop", elem_id="job-cancel")
            job_msg = gr.HTML()
            run_charts.build_samples(charts)
            lora_files = gr.File(label="Saved LoRAs (newest first)", file_count="multiple", interactive=False,
                                 height=150, elem_id="train-loras")
            with gr.Accordion("Log (the end, following)", open=False) as log_box:
                log_view = gr.Textbox(lines=14, max_lines=14, interactive=False, show_label=False,
                                      elem_id="train-log")
    timer = timers.new(TAB_ID, ctx.settings.poll_interval_s)
    slow_timer = timers.new(TAB_ID, max(3.0, ctx.settings.poll_interval_s * 3))
    files_sig = gr.State("")
    gpu_sig = gr.State("")

    # ---------------------------------------------------------------- form <-> TOML
    train_form = TrainForm(form, folder, repeats, ctx.layout.runs_dir, gr.State(start_cfg.to_toml()))
    form_inputs = train_form.inputs

    def on_form_change(values: dict, request: gr.Request):
        request_user(api, request)
        toml_text, note = render_toml(train_form, values)
        return (gr.skip() if toml_text is None else toml_text), note

    for component in form_inputs:
        component.change(on_form_change, form_inputs, [toml_view, form_msg], queue=False, show_progress="hidden",
                         api_visibility="private")

    def on_preset(name: str, request: gr.Request):
        request_user(api, request)
        with user_errors(api):
            return train_form.updates(preset_config(api, name))

    preset.input(on_preset, preset, list(form_inputs), api_visibility="private")

    def on_toml_file(file: str | None, request: gr.Request):
        request_user(api, request)
        if not file:
            return gr.skip()
        with user_errors(api):
            return train_form.updates(TrainConfig.from_toml_file(file))

    load_toml.upload(on_toml_file, load_toml, list(form_inputs), api_visibility="private")

    def on_export(text: str, request: gr.Request):
        request_user(api, request)
        return export_toml(text)

    toml_view.change(on_export, toml_view, save_toml, queue=False, show_progress="hidden", api_visibility="private")

    # ---------------------------------------------------------------- dataset
    def on_check(folder_text: str, buckets_text: str, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            found = check_dataset(api, user, folder_text, buckets_text)
        return (found.note, gr.update(value=found.thumbnails, visible=bool(found.thumbnails)),
                gr.update(value=found.rows, visible=bool(found.rows)), gr.update(visible=bool(found.rows)))

    buckets_box = form.components["dataset.frame_buckets"]
    check_outputs = [check_msg, thumbs, files, save_captions]
    check_btn.click(on_check, [folder, buckets_box], check_outputs, api_visibility="private")
    folder.input(on_check, [folder, buckets_box], check_outputs, api_visibility="private")

    def on_save_captions(folder_text: str, table: Any, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            return write_captions(api, user, folder_text, table)

    save_captions.click(on_save_captions, [folder, files], check_msg, api_visibility="private")

    def on_import(paths: list[str] | None, name: str, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            dest, note = import_dataset(api, user, paths, name)
        return gr.update(choices=api.dataset_folders(user), value=str(dest)), note

    def on_folder_focus(current: str | None, request: gr.Request):
        return gr.update(choices=api.dataset_folders(request_user(api, request)), value=current)

    folder.focus(on_folder_focus, folder, folder, queue=False, api_visibility="private")

    upload_btn.click(on_import, [uploads, upload_name], [folder, check_msg], api_visibility="private").then(
        on_check, [folder, buckets_box], check_outputs, api_visibility="private")

    # ---------------------------------------------------------------- start
    def on_start(values: dict, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            job = start_run(api, user, train_form.config(values), values.get(gpu_pick), values.get(num_gpus),
                            values.get(run_name))
        warned = "".join(f"<li>{html.escape(w)}</li>" for w in job.get("config_warnings", []))
        return (gr.update(value=job["id"], choices=[(f"#{job['id']} {job['name']}", job["id"])]),
                message(f"queued run #{job['id']} ({job['name']})", "ok")
                + (f"<ul class='problems'>{warned}</ul>" if warned else ""))

    # Queued: bring the run view into sight (it is far above Start, beside or over the long form).
    start.click(on_start, form_inputs | {gpu_pick, num_gpus, run_name}, [job_pick, start_msg],
                api_visibility="private").success(None, js=scroll_into_sight("#train-runs"))

    def on_plan(values: dict, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            return plan_note(api, user, train_form.config(values), values.get(gpu_pick), values.get(num_gpus))

    plan_btn.click(on_plan, form_inputs | {gpu_pick, num_gpus}, plan_msg, api_visibility="private")

    # ---------------------------------------------------------------- live reads
    def on_jobs_tick(current: int | None, request: gr.Request):
        rows, choices, pick = job_list(api, request_user(api, request), current)
        # The selection is left alone while it is listed: a tick that read it before Start picked the
        # new run must not put the old one back.
        return rows, gr.update(choices=choices) if pick == current else gr.update(choices=choices, value=pick)

    timer.tick(on_jobs_tick, job_pick, [jobs_table, job_pick], queue=False, show_progress="hidden",
               api_visibility="private")

    def on_job_tick(job_id: int | None, last_files: str, request: gr.Request):
        user = request_user(api, request)
        no_controls = [gr.update(interactive=False)] * len(CONTROLS)
        if job_id is None:
            return ("", progress_bar(None, "no run selected"), "", gr.skip(), last_files, *no_controls)
        try:
            panel = job_panel(api, user, job_id, last_files)
        except Exception:  # deleted or not visible: clear the panel
            return ("", progress_bar(None, ""), "", None, "", *no_controls)
        files_update = gr.skip() if panel.files is None else panel.files
        controls = [gr.update(interactive=action in panel.actions) for action in CONTROLS]
        return (panel.header, panel.bar, panel.log, files_update, panel.files_sig, *controls)

    control_buttons = {"stop": stop_btn, "save": save_btn, "resume": resume_btn, "cancel": cancel_btn}
    timer.tick(on_job_tick, [job_pick, files_sig],
               [job_header, job_progress, log_view, lora_files, files_sig,
                *(control_buttons[action] for action in CONTROLS)],
               queue=False, show_progress="hidden", api_visibility="private")
    job_pick.change(lambda: "", None, files_sig, queue=False, api_visibility="private")
    run_charts.wire(api, charts, timer, job_pick)
    for shown in (log_view.change, log_box.expand):  # the log reads from its end
        shown(None, js=scroll_to_end("#train-log textarea"), queue=False, api_visibility="private")

    def on_row_select(evt: gr.SelectData):
        row = getattr(evt, "row_value", None)
        return row[0] if row else gr.skip()

    jobs_table.select(on_row_select, None, job_pick, queue=False, api_visibility="private")

    for action, button in control_buttons.items():
        def on_control(job_id: int | None, request: gr.Request, action: str = action):
            user = request_user(api, request)
            if job_id == NOT_CONFIRMED:
                return message("nothing cancelled", "info")
            with user_errors(api):
                return control_job(api, user, job_id, action)

        # Cancel removes a queued run for good: the browser asks first.
        confirm = ("(job) => (job === null || confirm(`Cancel run #${job}? It leaves the queue.`)) ? job : "
                   f"{NOT_CONFIRMED}") if action == "cancel" else None
        button.click(on_control, job_pick, job_msg, js=confirm, api_visibility="private")

    def on_gpus_tick(last: str, request: gr.Request):
        choices, label = gpu_choices(api, request_user(api, request))
        sig = repr(choices)
        return (gr.skip(), last) if sig == last else (gr.update(choices=choices, label=label), sig)

    slow_timer.tick(on_gpus_tick, gpu_sig, [gpu_pick, gpu_sig], queue=False, show_progress="hidden",
                    api_visibility="private")
