"""The Train tab's run view: the runs table, the selected run's status, best save, LoRA downloads and
log, and its controls (the charts and the samples grid: tabs/run_charts.py). Handlers (api, user,
inputs) -> outputs, unit-tested in tests/test_train_tab.py; tabs/train.py wires them."""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

from engine.jobs import format_duration
from studio.api import StudioApi
from studio.auth import User
from studio.widgets import message, progress_bar, status_badge

JOB_COLUMNS = ["ID", "Name", "Owner", "Status", "Progress", "GPUs", "Created"]


def _job_row(job: dict[str, Any]) -> list[Any]:
    gpus = ",".join("cpu" if g < 0 else str(g) for g in job["gpus_assigned"]) or f"({job['gpus_requested']})"
    created = time.strftime("%m-%d %H:%M", time.localtime(job["created_at"] or 0))
    return [job["id"], job["name"], job["owner"], job["status"], job["progress"], gpus, created]


def job_list(api: StudioApi, user: User, current: int | None) -> tuple[list[list[Any]], list[tuple[str, int]], int | None]:
    """(table rows, run choices, the run to show: the current one if still listed, else the newest)."""
    jobs = api.list_jobs(user, limit=50)
    choices = [(f"#{j['id']} {j['name']} · {j['status']}", j["id"]) for j in jobs]
    pick = current if current in {j["id"] for j in jobs} else (jobs[0]["id"] if jobs else None)
    return [_job_row(j) for j in jobs], choices, pick


@dataclass
class JobPanel:
    header: str
    bar: str
    log: str
    files: list[str] | None  # LoRA downloads, None when unchanged since `last_files`
    files_sig: str
    actions: tuple[str, ...] = ()  # the controls that apply now; the others are greyed out


def job_panel(api: StudioApi, user: User, job_id: int, last_files: str) -> JobPanel:
    job = api.job_status(user, job_id)
    header = (f"{status_badge(job['status'])} <b>#{job['id']} {job['name']}</b>"
              f" <span class='muted'>{job['owner']} · {job['phase'] or ''}</span>")
    if job["failure_reason"]:
        header += message(f"{job['failure_reason']} {job['failure_hint'] or ''}", "error")
    if job.get("waiting_for"):  # never "queued" without a reason
        header += message(job["waiting_for"], "info")
    fraction = (job["step"] or 0) / job["total_steps"] if job["total_steps"] else None
    series = api.job_metrics(user, job_id)
    bar = progress_bar(fraction, pace_text(job, series))
    header += best_save_line(series.get("best"))
    saves = api.job_lora_files(user, job_id)
    fsig = f"{job_id}:" + ",".join(label for label, _ in saves)
    changed = fsig != last_files
    # Newest first: the box shows the first few rows.
    files = [api.file_link(file) for label, _ in reversed(saves)
             for file in api.lora_downloads(user, job_id, label)] if changed else None
    return JobPanel(header, bar, api.job_log(user, job_id)[-6000:], files, fsig, tuple(job.get("actions") or ()))


def pace_text(job: dict[str, Any], series: dict[str, Any]) -> str:
    """The progress bar's words: step, epoch, seconds per step, elapsed, ETA and total, loss."""
    pace, parts = series.get("pace") or {}, []
    if job["step"] is not None:
        parts.append(f"step {job['step']}/{job['total_steps']}" if job["total_steps"] else f"step {job['step']}")
    if pace.get("epoch"):
        parts.append(f"epoch {pace['epoch']}" + (f"/{series['epochs']}" if series.get("epochs") else ""))
    elapsed = pace.get("elapsed_s")
    if elapsed and pace.get("step"):
        parts.append(f"{elapsed / pace['step']:.2f} s/step")
    if elapsed and job["status"] == "running" and job.get("eta_s") is not None:
        parts.append(f"elapsed {format_duration(elapsed)} · ETA {format_duration(job['eta_s'])} "
                     f"of ~{format_duration(elapsed + job['eta_s'])}")
    elif elapsed:
        parts.append(f"took {format_duration(elapsed)}" if job["terminal"] else f"elapsed {format_duration(elapsed)}")
    if job.get("last_loss") is not None:
        parts.append(f"loss {job['last_loss']:.4g}")
    return " · ".join(parts) or job["phase"] or job["status"]


def best_save_line(best: dict[str, Any] | None) -> str:
    if not best:
        return ""
    return (f"<div class='best-save'>best save: <b>{html.escape(str(best['label']))}</b> "
            f"<span class='muted'>{html.escape(best['why'])}</span></div>")


CONTROLS = ("stop", "save", "resume", "cancel")  # the run view's buttons, in order


def control_job(api: StudioApi, user: User, job_id: int | None, action: str) -> str:
    if job_id is None:
        raise ValueError("select a run first")
    job = api.control_job(user, job_id, action)
    return message(f"#{job['id']}: {action} requested ({job['status']})", "ok")


