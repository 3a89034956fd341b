"""`studio jobs list|show|logs|samples|stop|save|resume|cancel ID`: the job queue from a terminal.

Works with or without a running studio: when none runs, this process briefly leads the queue
(records the outcome of trainers that ended meanwhile, escalates a stop, launches a resume).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TextIO

from engine.gpus import on_cpu
from engine.jobs import Job, JobError, JobStatus, format_duration
from engine.rundir import read_log_tail
from engine.scheduler import Scheduler
from studio.settings import StudioSettings

FOLLOW_POLL_S = 0.5


def open_scheduler(settings: StudioSettings) -> Scheduler:
    from studio.services import open_services

    return open_services(settings, poll_interval_s=min(settings.poll_interval_s, 1.0)).scheduler


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("jobs", help="list, inspect, stop, resume or cancel jobs")
    sub = parser.add_subparsers(dest="jobs_command", required=True)
    listing = sub.add_parser("list", help="newest jobs first")
    listing.add_argument("--owner", help="only this user's jobs")
    listing.add_argument("--status", help="comma-separated statuses, e.g. queued,running")
    listing.add_argument("--limit", type=int, default=30, help="at most this many jobs")
    listing.set_defaults(func=cmd_list)
    for name, func, text in (("show", cmd_show, "details, history and failure of one job"),
                             ("logs", cmd_logs, "the job's train.log"),
                             ("samples", cmd_samples, "sample videos per save, their scores, the best save"),
                             ("stop", cmd_stop, "stop a running job (stop file, then signals)"),
                             ("save", cmd_save, "save the running job's LoRA now (it keeps training)"),
                             ("resume", cmd_resume, "queue a stopped/failed/lost job again"),
                             ("cancel", cmd_cancel, "remove a queued job from the queue")):
        command = sub.add_parser(name, help=text)
        command.add_argument("id", type=int, help="the job's number (jobs list shows them)")
        command.set_defaults(func=func)
        if name == "logs":
            command.add_argument("-n", "--lines", type=int, default=50, help="how many lines from the end")
            command.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "stop":
            command.add_argument("--force", action="store_true", help="skip the grace period")
            command.add_argument("--no-wait", action="store_true", help="return at once")
        if name == "resume":
            command.add_argument("--follow", action="store_true", help="show progress until the job ends")


def _with_scheduler(func):
    def run(args: argparse.Namespace, settings: StudioSettings) -> int:
        sched = open_scheduler(settings)
        try:
            return func(args, sched, sys.stdout)
        except JobError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            sched.shutdown()
    return run


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%m-%d %H:%M") if timestamp else "-"


def _devices(job: Job) -> str:
    if not job.gpus_assigned:
        return ("gpu " if job.gpus_explicit else "") + job.gpus_requested
    if on_cpu(job.gpus_assigned):
        return f"cpu x{len(job.gpus_assigned)}"
    return "gpu " + ",".join(str(d) for d in job.gpus_assigned)


@_with_scheduler
def cmd_list(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    sched.refresh()
    statuses = [s.strip() for s in args.status.split(",")] if args.status else None
    try:
        jobs = sched.list_jobs(owner=args.owner, statuses=statuses, limit=args.limit)
    except ValueError as exc:
        raise JobError(f"--status: {exc}; use {', '.join(s.value for s in JobStatus)}") from None
    rows = [("ID", "STATUS", "NAME", "OWNER", "DEVICES", "PROGRESS", "CREATED")]
    rows += [(str(j.id), j.status.value, j.name[:24], j.owner[:12], _devices(j), j.progress_text,
              _when(j.created_at)) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    if not jobs:
        out.write("no jobs\n")
    waits = sched.queue_waits() if any(j.status == JobStatus.QUEUED for j in jobs) else {}
    for job in jobs:  # never "queued" without a reason
        if job.id in waits:
            out.write(f"#{job.id} waits: {waits[job.id].describe()}\n")
    return 0


@_with_scheduler
def cmd_show(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    sched.refresh()
    job = sched.get(args.id)
    fields = [("job", f"{job.id} {job.name} ({job.kind})"), ("owner", job.owner), ("status", job.status.value),
              ("progress", job.progress_text or "-"), ("devices", _devices(job)),
              ("master port", job.master_port), ("pid", job.pid), ("run dir", job.run_dir),
              ("log", job.log_path), ("created", _when(job.created_at)), ("started", _when(job.started_at)),
              ("ended", _when(job.ended_at)), ("exit code", job.exit_code), ("launches", job.attempts),
              ("priority", job.priority)]
    for key, value in fields:
        if value is not None:
            out.write(f"{key:>12}: {value}\n")
    if job.failure_reason:
        out.write(f"{'failure':>12}: {job.failure_reason}\n{'hint':>12}: {job.failure_hint}\n")
    if job.status == JobStatus.QUEUED and job.id in (waits := sched.queue_waits()):
        out.write(f"{'waiting':>12}: {waits[job.id].describe()}\n")
    out.write(saved_outputs(job))
    out.write("\nhistory:\n")
    for event in sched.events(job.id):
        out.write(f"  {_when(event.time)}  {event.kind:<10} {event.message}\n")
    if job.log_tail:
        out.write("\nlog tail:\n" + job.log_tail + "\n")
    return 0


def saved_outputs(job: Job) -> str:
    """Where a run's LoRAs (newest last) and samples are: the end of `train --follow` and `jobs show`."""
    if not job.run_dir:
        return ""
    from engine.metrics import loss_series
    from engine.rundir import RunDir

    saves = RunDir(job.run_dir).loras()
    lines = ["", f"LoRAs ({len(saves)}):" if saves else "LoRAs: none saved yet"]
    lines += [f"  {save.label:<10} {save.file}" for save in saves]
    series = loss_series(job.run_dir, max_points=2)
    if series.get("samples"):
        lines += ["samples:", *("  " + line for line in format_samples(series, Path(job.run_dir)).splitlines())]
    return "\n".join(lines) + "\n"


@_with_scheduler
def cmd_samples(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    from engine.metrics import loss_series

    job = sched.get(args.id)
    series = loss_series(job.run_dir, max_points=2) if job.run_dir else {}
    out.write(format_samples(series, Path(job.run_dir or ".")))
    return 0


def format_samples(series: dict, run_dir: Path) -> str:
    """One block per sampled save: step, time, mean scores, then each video's file, prompt and scores."""
    samples = series.get("samples") or []
    if not samples:
        return "no samples yet (add a [sample] table to the config)\n"
    lines = []
    for event in samples:
        scores = " ".join(f"{k} {v:.2f}" for k, v in (event.get("scores") or {}).items())
        lines.append(f"{event['label']} (step {event['step']}, {event.get('seconds', 0):.1f} s) {scores}".rstrip())
        for video in event.get("videos", []):
            mark = " ".join(f"{k} {v:.0f}" for k, v in (video.get("scores") or {}).items())
            lines.append(f"  {run_dir / video['file']}  seed {video['seed']}  {video['prompt']}  {mark}".rstrip())
    best = series.get("best")
    if best:
        lines.append(f"best save: {best['label']} ({best['why']})")
    return "\n".join(lines) + "\n"


@_with_scheduler
def cmd_logs(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    job = sched.get(args.id)
    if not job.log_path or not Path(job.log_path).exists():
        out.write(f"job {job.id} has no log yet ({job.status.value})\n")
        return 0
    out.write(read_log_tail(job.log_path, lines=args.lines) + "\n")
    if not args.follow:
        return 0
    sched.start()
    with open(job.log_path, "rb") as handle:
        handle.seek(0, 2)
        while True:
            chunk = handle.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
            elif sched.get(job.id).status.is_terminal:
                return 0
            else:
                time.sleep(FOLLOW_POLL_S)


@_with_scheduler
def cmd_stop(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    sched.start()  # when no studio runs, this process escalates the stop itself
    job = sched.stop(args.id, force=args.force)
    if args.no_wait or job.status.is_terminal:
        out.write(f"job {job.id}: {job.status.value}\n")
        return 0
    out.write(f"job {job.id}: stopping (stop file written; signals after {sched.stop_grace_s:.0f} s)\n")
    job = wait_until(sched, job.id, lambda j: j.status.is_terminal,
                     sched.stop_grace_s + sched.kill_grace_s + 60)
    out.write(f"job {job.id}: {job.status.value}\n")
    return 0 if job.status.is_terminal else 1


@_with_scheduler
def cmd_save(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    sched.request_save(args.id)
    out.write(f"job {args.id}: save requested (a step<N>/ LoRA appears after the current step)\n")
    return 0


@_with_scheduler
def cmd_cancel(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    job = sched.cancel(args.id)
    out.write(f"job {job.id}: {job.status.value}\n")
    return 0


@_with_scheduler
def cmd_resume(args: argparse.Namespace, sched: Scheduler, out: TextIO) -> int:
    sched.refresh()
    job = sched.resume(args.id)
    out.write(f"job {job.id}: queued again in {job.run_dir}\n")
    return launch_and_report(sched, job, args.follow, out, args.hint)


def launch_and_report(sched: Scheduler, job: Job, follow: bool, out: TextIO, hint: str = "studio") -> int:
    """Run the scheduler until the job starts (or, with follow, ends). `hint` starts the command lines
    it suggests (the program and the settings flags this command was given)."""
    sched.start()
    if follow:
        return follow_job(sched, job.id, out, hint)
    if not sched.is_leader:
        out.write(f"a running studio launches it; watch with `{hint} jobs show {job.id}`\n")
        return 0
    try:
        job = wait_until(sched, job.id, lambda j: j.status != JobStatus.QUEUED, None,
                         note=lambda: out.write(f"waiting: {_wait_reason(sched, job.id)}\n"))
    except KeyboardInterrupt:
        out.write(f"\njob {job.id} stays queued; it starts when a studio or this command runs again\n")
        return 0
    out.write(f"job {job.id}: {job.status.value}" + (f" (pid {job.pid})" if job.pid else "") + "\n")
    if job.status.is_active:
        out.write(f"the trainer keeps running after this command; `{hint} jobs show {job.id}` records its outcome\n")
    return 0 if job.status != JobStatus.FAILED else 1


def _wait_reason(sched: Scheduler, job_id: int) -> str:
    wait = sched.queue_waits().get(job_id)
    return wait.describe() if wait is not None else "for free devices"


def wait_until(sched: Scheduler, job_id: int, predicate, timeout_s: float | None, note=None) -> Job:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    noted = False
    while True:
        job = sched.get(job_id)
        if predicate(job) or (deadline is not None and time.monotonic() > deadline):
            return job
        if note is not None and not noted and job.status == JobStatus.QUEUED and sched.is_leader:
            time.sleep(2 * sched.poll_interval_s)
            if sched.get(job_id).status == JobStatus.QUEUED:
                note()
                noted = True
        time.sleep(FOLLOW_POLL_S)


def progress_line(job: Job) -> str:
    parts = [f"[job {job.id}] {job.status.value:<9}"]
    if job.step is not None and job.total_steps:
        filled = int(20 * min(1.0, job.step / job.total_steps))
        parts.append(f"|{'#' * filled}{'.' * (20 - filled)}| {job.step}/{job.total_steps}")
    elif job.phase:
        parts.append(job.phase)
    if job.last_loss is not None:
        parts.append(f"loss {job.last_loss:.4f}")
    if job.eta_s is not None and job.status == JobStatus.RUNNING:
        parts.append(f"ETA {format_duration(job.eta_s)}")
    return " ".join(parts)


def follow_job(sched: Scheduler, job_id: int, out: TextIO, hint: str = "studio") -> int:
    """Print a progress line until the job ends; return its exit status (0 = succeeded)."""
    interactive = out.isatty()
    last = ""
    try:
        while True:
            job = sched.get(job_id)
            line = progress_line(job)
            if line != last:
                out.write(("\r" + line.ljust(len(last))) if interactive else line + "\n")
                out.flush()
                last = line
            if job.status.is_terminal:
                break
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        out.write(f"\nstopped following; job {job_id} keeps running "
                  f"(`{hint} jobs stop {job_id}` stops it)\n")
        return 130
    if interactive:
        out.write("\n")
    if job.failure_reason:
        out.write(f"{job.status.value}: {job.failure_reason}\n{job.failure_hint}\n")
        if job.log_tail:
            out.write("--- log tail ---\n" + "\n".join(job.log_tail.splitlines()[-15:]) + "\n")
    out.write(saved_outputs(job))
    return exit_status(job)


def exit_status(job: Job) -> int:
    if job.status == JobStatus.SUCCEEDED:
        return 0
    if job.status == JobStatus.STOPPED:
        return 0 if job.exit_code == 0 else 3
    if job.exit_code is not None and 0 < job.exit_code < 256:
        return job.exit_code
    return 1

