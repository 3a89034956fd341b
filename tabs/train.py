"""The Train tab: dataset, config form (by key path), presets, TOML, GPU picker, jobs and live charts."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr

from engine.config import ConfigError, DirectoryConfig, TrainConfig
from studio import datasets as ds
from studio.api import StudioApi
from studio.http_api import request_user, user_errors
from studio.context import StudioContext
from studio.plots import loss_figure
from studio.presets import DEMO_PRESET, PRESET_NAMES, load_preset
from studio.widgets import ConfigForm, message, progress_bar, status_badge

JOB_COLUMNS = ["ID", "Name", "Owner", "Status", "Progress", "GPUs", "Created"]
FILE_COLUMNS = ["file", "kind", "frames", "size", "bucket", "caption"]


def _job_row(job: dict[str, Any]) -> list[Any]:
    gpus = ",".join("cpu" if g < 0 else str(g) for g in job["gpus_assigned"]) or f"({job['gpus_requested']})"
    created = time.strftime("%m-%d %H:%M", time.localtime(job["created_at"] or 0))
    return [job["id"], job["name"], job["owner"], job["status"], job["progress"], gpus, created]


def _dataset_dir(cfg: TrainConfig, folder: str, repeats: float | None) -> TrainConfig:
    cfg.dataset.directory = [DirectoryConfig(path=folder.strip(), num_repeats=int(repeats or 1))] if folder else []
    return cfg


def build(ctx: StudioContext, api: StudioApi) -> None:
    roots = ctx.settings.dataset_roots
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
                    save_toml = gr.DownloadButton("Save TOML", size="sm")
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
                start = gr.Button("Start training", variant="primary", scale=2, elem_id="train-start")
            start_msg = gr.HTML()

        # ---------------------------------------------------------------- runs
        with gr.Column(scale=6, elem_classes=["panel"]):
            gr.Markdown("### Runs")
            jobs_table = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, max_height=260, elem_id="train-jobs")
            job_pick = gr.Dropdown([], label="Selected run", elem_id="train-job-pick")
            job_header = gr.HTML(elem_id="train-job-status")
            job_progress = gr.HTML(progress_bar(None, ""), elem_id="train-job-progress")
            loss_plot = gr.Plot(loss_figure(None), label="Loss", elem_id="train-loss")
            with gr.Row():
                stop_btn = gr.Button("Stop", size="sm", min_width=80, elem_id="job-stop")
                save_btn = gr.Button("Save now", size="sm", min_width=80, elem_id="job-save")
                resume_btn = gr.Button("Resume", size="sm", min_width=80, elem_id="job-resume")
                cancel_btn = gr.Button("Cancel", size="sm", min_width=80, variant="stop", elem_id="job-cancel")
            job_msg = gr.HTML()
            lora_files = gr.File(label="Saved LoRAs", file_count="multiple", interactive=False, height=120)
            with gr.Accordion("Log", open=False):
                log_view = gr.Code(language=None, lines=14, max_lines=14, interactive=False, elem_id="train-log")
    timer = gr.Timer(ctx.settings.poll_interval_s)
    slow_timer = gr.Timer(max(3.0, ctx.settings.poll_interval_s * 3))
    plot_sig = gr.State("")
    files_sig = gr.State("")
    gpu_sig = gr.State("")

    # ---------------------------------------------------------------- form <-> TOML
    form_inputs = form.inputs | {folder, repeats}

    def current_config(values: dict) -> TrainConfig:
        cfg = form.to_config(values, TrainConfig(output_dir=str(ctx.layout.runs_dir)))
        return _dataset_dir(cfg, values.get(folder) or "", values.get(repeats))

    def render(values: dict, request: gr.Request):
        request_user(api, request)
        try:
            cfg = current_config(values)
        except ConfigError as exc:
            return gr.skip(), message(str(exc), "error")
        try:
            cfg.validate()
            note = ""
        except ConfigError as exc:
            note = message(str(exc), "error")
        return cfg.to_toml(), note

    for component in form_inputs:
        component.change(render, form_inputs, [toml_view, form_msg], queue=False, show_progress="hidden",
                         api_visibility="private")

    def show_config(cfg: TrainConfig):
        directory = cfg.dataset.directory[0] if cfg.dataset.directory else None
        updates = form.updates(cfg)
        # A preset without a dataset keeps the folder already chosen.
        updates[folder] = directory.path if directory else gr.skip()
        updates[repeats] = directory.num_repeats if directory else gr.skip()
        return updates

    def apply_preset(name: str, request: gr.Request):
        request_user(api, request)
        with user_errors():
            return show_config(load_preset(name, ctx.layout.runs_dir, ctx.layout.home))

    preset.input(apply_preset, preset, list(form_inputs), api_visibility="private")

    def apply_toml_file(file: str | None, request: gr.Request):
        request_user(api, request)
        if not file:
            return gr.skip()
        with user_errors():
            return show_config(TrainConfig.from_toml_file(file))

    load_toml.upload(apply_toml_file, load_toml, list(form_inputs), api_visibility="private")

    def export_toml(text: str, request: gr.Request):
        request_user(api, request)
        # A temp folder: Gradio hands out files from there, and nothing else lives in it.
        target = Path(tempfile.mkdtemp(prefix="studio-toml-")) / f"train-{time.strftime('%Y%m%d-%H%M%S')}.toml"
        target.write_text(text, encoding="utf-8")
        return str(target)

    save_toml.click(export_toml, toml_view, save_toml, api_visibility="private")

    # ---------------------------------------------------------------- dataset
    def check(folder_text: str, buckets_text: str, request: gr.Request):
        request_user(api, request)
        with user_errors():
            path = ds.confine(folder_text, roots)
            buckets = [int(b) for b in str(buckets_text).replace(" ", "").split(",") if b]
            found = ds.scan_dataset(path)
        problems = ds.check_dataset(found, buckets)
        summary = f"{len(found)} files in {path.name}: " + (
            "no problems found" if not problems else f"{len(problems)} problem(s)")
        note = message(summary, "ok" if not problems else "error")
        if problems:
            note += "<ul class='problems'>" + "".join(f"<li>{p}</li>" for p in problems[:50]) + "</ul>"
        rows = [[f.name, f.kind, f.frames if f.frames is not None else "?",
                 f"{f.width}x{f.height}" if f.width else "?",
                 ds.bucket_for(f.frames, buckets) if f.frames else "-", f.caption or ""] for f in found]
        shots = [(str(t), f.name) for f in found[:64]
                 if (t := ds.thumbnail(path / f.name, ctx.layout.cache_dir / "thumbs")) is not None]
        has = bool(found)
        return (note, gr.update(value=shots, visible=bool(shots)), gr.update(value=rows, visible=has),
                gr.update(visible=has))

    buckets_box = form.components["dataset.frame_buckets"]
    check_btn.click(check, [folder, buckets_box], [check_msg, thumbs, files, save_captions],
                    api_name="check_dataset", api_visibility="undocumented")
    folder.input(check, [folder, buckets_box], [check_msg, thumbs, files, save_captions], api_visibility="private")

    def write_captions(folder_text: str, table: Any, request: gr.Request):
        request_user(api, request)
        with user_errors():
            path = ds.confine(folder_text, roots)
            rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
            for row in rows:
                ds.save_caption(path, str(row[0]), str(row[-1] or ""))
        return message(f"saved {len(rows)} captions", "ok")

    save_captions.click(write_captions, [folder, files], check_msg, api_visibility="private")

    def import_files(paths: list[str] | None, name: str, request: gr.Request):
        user = request_user(api, request)
        if not paths:
            raise gr.Error("choose files to upload first")
        dest = api.user_uploads(user) / "datasets" / ds.safe_name(name or time.strftime("upload-%Y%m%d-%H%M%S"))
        with user_errors():
            written = ds.import_uploads(paths, dest, ctx.settings.max_upload_mb * 2**20)
        return (gr.update(choices=ds.list_dataset_folders(roots), value=str(dest)),
                message(f"imported {len(written)} files into {dest.name}", "ok"))

    upload_btn.click(import_files, [uploads, upload_name], [folder, check_msg], api_visibility="private").then(
        check, [folder, buckets_box], [check_msg, thumbs, files, save_captions], api_visibility="private")

    # ---------------------------------------------------------------- start
    def start_run(values: dict, request: gr.Request):
        # The config comes from the form itself, not from the TOML preview: the preview is refreshed by
        # change events that can still be in flight when Start is clicked right after a preset or TOML load.
        user = request_user(api, request)
        with user_errors():
            toml_text = current_config(values).to_toml()
            gpus, count = values.get(gpu_pick) or [], int(values.get(num_gpus) or 1)
            job = api.start_training(user, toml_text, ",".join(gpus), count, values.get(run_name) or "")
        return (gr.update(value=job["id"], choices=[(f"#{job['id']} {job['name']}", job["id"])]),
                message(f"queued run #{job['id']} ({job['name']})", "ok"))

    start.click(start_run, form_inputs | {gpu_pick, num_gpus, run_name}, [job_pick, start_msg],
                api_visibility="private")

    # ---------------------------------------------------------------- live reads
    def refresh_jobs(current: int | None, request: gr.Request):
        user = request_user(api, request)
        jobs = api.list_jobs(user, limit=50)
        choices = [(f"#{j['id']} {j['name']} · {j['status']}", j["id"]) for j in jobs]
        pick = current if current in {j["id"] for j in jobs} else (jobs[0]["id"] if jobs else None)
        return [_job_row(j) for j in jobs], gr.update(choices=choices, value=pick)

    timer.tick(refresh_jobs, job_pick, [jobs_table, job_pick], queue=False, show_progress="hidden",
               api_visibility="private")

    def refresh_job(job_id: int | None, last_plot: str, last_files: str, request: gr.Request):
        user = request_user(api, request)
        if job_id is None:
            return ("", progress_bar(None, "no run selected"), gr.skip(), "", gr.skip(), last_plot, last_files)
        try:
            job = api.job_status(user, job_id)
        except Exception:  # deleted or not visible: clear the panel
            return ("", progress_bar(None, ""), loss_figure(None), "", None, "", "")
        header = (f"{status_badge(job['status'])} <b>#{job['id']} {job['name']}</b>"
                  f" <span class='muted'>{job['owner']} · {job['phase'] or ''}</span>")
        if job["failure_reason"]:
            header += message(f"{job['failure_reason']} {job['failure_hint'] or ''}", "error")
        fraction = (job["step"] or 0) / job["total_steps"] if job["total_steps"] else None
        bar = progress_bar(fraction, job["progress"] or job["status"])
        series = api.job_metrics(user, job_id)
        sig = f"{job_id}:{len(series['step'])}:{series['step'][-1] if series['step'] else ''}:{job['status']}"
        plot = loss_figure(series) if sig != last_plot else gr.skip()
        saves = api.job_lora_files(user, job_id)
        fsig = f"{job_id}:" + ",".join(label for label, _ in saves)
        file_update = [str(api.lora_download(user, job_id, label)) for label, _ in saves] \
            if fsig != last_files else gr.skip()
        return header, bar, plot, api.job_log(user, job_id)[-6000:], file_update, sig, fsig

    timer.tick(refresh_job, [job_pick, plot_sig, files_sig],
               [job_header, job_progress, loss_plot, log_view, lora_files, plot_sig, files_sig],
               queue=False, show_progress="hidden", api_visibility="private")
    job_pick.change(lambda: ("", ""), None, [plot_sig, files_sig], queue=False, api_visibility="private")

    def select_row(evt: gr.SelectData):
        row = getattr(evt, "row_value", None)
        return row[0] if row else gr.skip()

    jobs_table.select(select_row, None, job_pick, queue=False, api_visibility="private")

    def control(action: str):
        def handler(job_id: int | None, request: gr.Request):
            user = request_user(api, request)
            if job_id is None:
                raise gr.Error("select a run first")
            with user_errors():
                job = api.control_job(user, job_id, action)
            return message(f"#{job['id']}: {action} requested ({job['status']})", "ok")

        return handler

    for button, action in ((stop_btn, "stop"), (save_btn, "save"), (resume_btn, "resume"), (cancel_btn, "cancel")):
        button.click(control(action), job_pick, job_msg, api_visibility="private")

    def refresh_gpus(last: str, request: gr.Request):
        status = api.gpu_status(request_user(api, request))
        choices = [(f"GPU {g['index']} · {g['name']} · "
                    + (f"busy: {g['job']}" if g["job"] else
                       f"free {((g['memory_total_mib'] or 0) - (g['memory_used_mib'] or 0)) / 1024:.0f} GiB"),
                    str(g["index"])) for g in status["gpus"]]
        sig = repr(choices)
        if sig == last:
            return gr.skip(), last
        label = "GPUs (none ticked: any free)" if choices else "No GPU on this machine: runs use a CPU slot"
        return gr.update(choices=choices, label=label), sig

    slow_timer.tick(refresh_gpus, gpu_sig, [gpu_pick, gpu_sig], queue=False, show_progress="hidden",
                    api_visibility="private")
