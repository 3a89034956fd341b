"""The studio's actions, authorised per user: the one place the tabs and the HTTP API both call.

`StudioApi` methods take plain values plus the signed-in `User`, check ownership, call the engine
and return plain dicts (JSON for the API). No Gradio here: `studio.http_api` publishes these
methods as endpoints, and scripts and tests call them directly.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import ConfigError, DatasetConfig, DirectoryConfig, TrainConfig
from engine.dataset import plan_dataset, require_trainable
from engine.jobs import ACTIVE_STATUSES, RESUMABLE_STATUSES, Job, JobError, JobStatus, parse_job_id
from engine.numbers import named_whole_number, whole_number
from engine.paths import safe_name
from engine.rundir import SAMPLES_DIR, RunDir, read_log_tail
from studio.api_media import MediaApi, run_loras, without_paths
from studio.auth import AccessDenied, User
from studio.compare import CompareApi
from studio.datasets import DatasetError, confine

if TYPE_CHECKING:
    from studio.context import StudioContext

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 12_000
MAX_DEVICES = 1024  # GPUs or CPU slots one job may ask for
# Errors a user can act on; anything else is a bug and is logged with its traceback.
USER_ERRORS = (AccessDenied, ConfigError, DatasetError, JobError, FileNotFoundError, ValueError)


def job_summary(job: Job) -> dict[str, Any]:
    """The JSON shape of a job in lists and status replies (no server paths)."""
    return {
        "id": job.id,
        "name": job.name,
        "owner": job.owner,
        "kind": job.kind,
        "status": str(job.status),
        "terminal": job.status.is_terminal,
        "step": job.step,
        "total_steps": job.total_steps,
        "last_loss": job.last_loss,
        "eta_s": job.eta_s,
        "phase": job.phase,
        "progress": job.progress_text,
        "gpus_requested": job.gpus_requested,
        "gpus_assigned": list(job.gpus_assigned),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "exit_code": job.exit_code,
        "failure_reason": job.failure_reason,
        "failure_hint": job.failure_hint,
    }


# The states in which each control makes sense (item f of issue 16); elsewhere it is refused by name.
CONTROL_STATES: dict[str, frozenset[JobStatus]] = {
    "stop": frozenset({JobStatus.QUEUED, *ACTIVE_STATUSES}),
    "cancel": frozenset({JobStatus.QUEUED}),
    "save": frozenset({JobStatus.STARTING, JobStatus.RUNNING}),
    "resume": RESUMABLE_STATUSES,
}


def allowed_actions(job: Job) -> list[str]:
    """The controls that apply to the job now (the UI greys out the others)."""
    return [action for action, states in CONTROL_STATES.items() if job.status in states]


def control_refusal(job: Job, action: str) -> str | None:
    """Why `action` does not apply to the job now, in words; None when it does."""
    if action not in CONTROL_STATES:
        return f"unknown job action {action!r}"
    if job.status in CONTROL_STATES[action]:
        return None
    if job.status.is_terminal:
        hint = "; resume it to go on" if action in ("stop", "save") and job.status in RESUMABLE_STATUSES else ""
        return f"job {job.id} already {job.status.value}{hint}"
    hints = {"cancel": "; use stop", "save": "; only a running job can save", "resume": "; stop it first"}
    return f"job {job.id} is {job.status.value}{hints.get(action, '')}"


class StudioApi(MediaApi, CompareApi):
    """Authorised actions over the context's engine services."""

    def __init__(self, ctx: "StudioContext") -> None:
        self.ctx = ctx

    # ---- users ---------------------------------------------------------------------------------
    def user(self, username: str | None) -> User:
        return self.ctx.accounts.user(username)

    def _owner_filter(self, user: User, all_users: bool = True) -> str | None:
        return None if user.is_admin and all_users else user.name

    def file_link(self, path: str | Path) -> str:
        """What a tab hands Gradio for a run or gallery file whose owner it has checked: an
        expiring link (studio.files); those trees themselves are never served."""
        return self.ctx.file_link(path)

    def redact(self, text: str | None) -> str | None:
        """A message for users without the data directory's location in it."""
        return self.ctx.redact(text)

    # ---- dataset folders -------------------------------------------------------------------------
    def dataset_roots(self, user: User) -> tuple[Path, ...]:
        """Where this user's datasets may come from: the shared roots and their own uploads (an
        admin: everyone's uploads)."""
        uploads = self.ctx.layout.uploads_dir if user.is_admin else self.user_uploads(user)
        return (*self.ctx.settings.shared_dataset_roots, uploads.resolve())

    def writable_dataset_roots(self, user: User) -> tuple[Path, ...]:
        """Where this user may change files (captions): their uploads; an admin anywhere readable."""
        return self.dataset_roots(user) if user.is_admin else (self.user_uploads(user).resolve(),)

    def dataset_folders(self, user: User) -> list[str]:
        """The folder picker's choices: folders with media under this user's roots."""
        from studio.datasets import list_dataset_folders

        return list_dataset_folders(self.dataset_roots(user))

    # ---- jobs ----------------------------------------------------------------------------------
    def own_job(self, user: User, job_id: int | str) -> Job:
        number = parse_job_id(job_id)  # "1.5" is refused, never read as job 1
        try:
            job = self.ctx.scheduler.get(number)
        except JobError:
            raise AccessDenied(f"job {number} not found") from None
        self.ctx.accounts.check_owner(user, job.owner, f"job {number}")
        return job

    def prepare_config(self, user: User, config_toml: str) -> TrainConfig:
        """Parse + validate a training TOML and pin what a user may not choose: where files go."""
        cfg = TrainConfig.from_toml_string(config_toml or "")
        cfg = cfg.with_value("output_dir", str(self.ctx.layout.runs_dir)).with_value("cache_dir", None)
        roots = self.dataset_roots(user)
        if not cfg.dataset.directory:
            raise ConfigError("dataset.directory", "choose a dataset folder")
        tables = [("dataset", cfg.dataset)] + [(f"eval_datasets[{k}].dataset", e.dataset)
                                               for k, e in enumerate(cfg.eval_datasets or [])]
        for key, table in tables:
            for i, directory in enumerate(table.directory):
                try:
                    directory.path = str(confine(directory.path, roots))
                except DatasetError as exc:
                    raise ConfigError(f"{key}.directory[{i}].path", str(exc)) from None
        if cfg.adapter.init_from_existing:
            self.lora_file(user, cfg.adapter.init_from_existing)
        return cfg.validate()

    def start_training(self, user: User, config_toml: str, gpus: str = "", num_gpus: int = 1,
                       name: str = "") -> dict[str, Any]:
        cfg = self.prepare_config(user, config_toml)
        require_trainable(plan_dataset(cfg.dataset), ", ".join(d.path for d in cfg.dataset.directory),
                          cfg.micro_batch_size_per_gpu)
        try:
            explicit = [whole_number(g, 0, MAX_DEVICES - 1) for g in str(gpus or "").replace(" ", "").split(",") if g]
        except ValueError:
            raise JobError(f"gpus: expected comma-separated GPU indices like '0,1', got {gpus!r}") from None
        count = None if explicit else named_whole_number("num_gpus", num_gpus or 1, 1, MAX_DEVICES)
        default_name = Path(cfg.dataset.directory[0].path).name
        job = self.ctx.scheduler.submit_training(cfg.to_toml(), owner=user.name, gpus=explicit or None,
                                                 num_gpus=count, name=(name or "").strip() or default_name)
        log.info("user %s started job %s", user.name, job.id)
        return {**job_summary(job), "config_warnings": cfg.warnings}

    def plan_training(self, user: User, config_toml: str, gpus: str = "", num_gpus: int = 1,
                      card: str = "") -> dict[str, Any]:
        """Will the config fit, and how long will it take (engine.planner): on the GPUs Start would use,
        or on `card` ("RTX 4090" or "RTX 4090:24" GiB) instead."""
        from engine.planner import DeviceSet, plan_training

        cfg = self.prepare_config(user, config_toml)
        devices = DeviceSet.choose(self.ctx.gpus.list(), gpus, num_gpus, card)
        return without_paths(plan_training(cfg, devices).as_dict())

    def check_dataset(self, user: User, folder: str = "", frame_buckets: str = "",
                      config_toml: str = "") -> dict[str, Any]:
        """The dataset preview (engine.dataset's plan, as the trainer will follow it) of an allowed
        folder with these frame buckets, or of a training TOML's dataset."""
        from studio.datasets import check

        if config_toml.strip():
            cfg = self.prepare_config(user, config_toml)
            return check(cfg.dataset, cfg.micro_batch_size_per_gpu, cfg.gradient_accumulation_steps)
        dataset = DatasetConfig(directory=[DirectoryConfig(path=str(confine(folder, self.dataset_roots(user))))])
        buckets = [int(b) for b in str(frame_buckets or "").replace(" ", "").split(",") if b]
        if buckets:
            dataset.frame_buckets = buckets
        return check(dataset)

    def list_jobs(self, user: User, statuses: list[str] | None = None, limit: int = 50,
                  offset: int = 0) -> list[dict[str, Any]]:
        jobs = self.ctx.scheduler.list_jobs(owner=self._owner_filter(user), statuses=statuses or None,
                                            limit=min(named_whole_number("limit", limit, 1), 500),
                                            offset=named_whole_number("offset", offset, 0))
        waits = self.ctx.scheduler.queue_waits() if any(j.status == JobStatus.QUEUED for j in jobs) else {}
        return [self._summary(user, j, waits) for j in jobs]

    def _summary(self, user: User, job: Job, waits: dict[int, Any] | None = None) -> dict[str, Any]:
        """job_summary + why it waits (queued), the controls that apply, messages without server paths."""
        data = job_summary(job)
        data["failure_reason"], data["failure_hint"] = self.redact(job.failure_reason), self.redact(job.failure_hint)
        data["actions"] = allowed_actions(job)
        data["queue_position"] = data["waiting_for"] = None
        if job.status == JobStatus.QUEUED:
            wait = (self.ctx.scheduler.queue_waits() if waits is None else waits).get(job.id)
            if wait is not None:
                data["queue_position"], data["waiting_for"] = wait.position, wait.describe(user.can_access)
        return data

    def job_status(self, user: User, job_id: int | str) -> dict[str, Any]:
        job = self.own_job(user, job_id)
        return {**self._summary(user, job), "loras": [label for label, _ in run_loras(job.run_dir)],
                "log_tail": job.log_tail or ""}

    def job_log(self, user: User, job_id: int | str) -> str:
        job = self.own_job(user, job_id)
        return read_log_tail(job.log_path, lines=None, max_bytes=LOG_TAIL_BYTES) or (job.log_tail or "")

    def job_metrics(self, user: User, job_id: int | str, max_points: int = 2000) -> dict[str, Any]:
        from engine.metrics import loss_series

        job = self.own_job(user, job_id)
        if not job.run_dir:
            return {"step": [], "loss": [], "lr": [], "epoch_steps": []}
        return loss_series(job.run_dir, max_points=max_points, cache=self.ctx.loss_cache)

    def job_samples(self, user: User, job_id: int | str) -> dict[str, Any]:
        """The run's `sample` events (videos as run-relative files, scores) and its best save."""
        series = self.job_metrics(user, job_id, max_points=2)
        return {"samples": series.get("samples", []), "best": series.get("best")}

    def job_lora_files(self, user: User, job_id: int | str) -> list[tuple[str, Path]]:
        return run_loras(self.own_job(user, job_id).run_dir)

    def lora_downloads(self, user: User, job_id: int | str, label: str) -> list[Path]:
        """A save's LoRA under a telling name ('<run>-epoch3.safetensors'), hard links in the run folder; a
        two-expert save (Wan2.2 A14B) gives both files, named by expert ('<run>-epoch3-low_noise_model...')."""
        from engine.lora import expert_partner

        job = self.own_job(user, job_id)
        source = dict(run_loras(job.run_dir)).get(label)
        if source is None:
            raise FileNotFoundError(f"job {job_id} has no save {label!r}")
        partner = expert_partner(source)
        stem = f"{safe_name(Path(job.run_dir).name)}-{label}"
        if partner is None:
            return [_linked(source, Path(job.run_dir) / "downloads" / f"{stem}.safetensors")]
        return [_linked(file, Path(job.run_dir) / "downloads" / f"{stem}-{file.name}") for file in (source, partner)]

    def job_sample_file(self, user: User, job_id: int | str, relative: str) -> Path:
        """A sample video or its poster (`samples/<label>/<k>.mp4|png`, as the loss series names it)."""
        samples = RunDir(self.own_job(user, job_id).run_dir).path / SAMPLES_DIR
        path = (samples.parent / relative).resolve()
        if not path.is_relative_to(samples.resolve()) or not path.is_file():
            raise FileNotFoundError(f"job {job_id} has no sample {relative!r}")
        return path

    def control_job(self, user: User, job_id: int | str, action: str) -> dict[str, Any]:
        job = self.own_job(user, job_id)
        refusal = control_refusal(job, action)
        if refusal is not None:  # e.g. Stop on a succeeded run: "job 1 already succeeded", not "stop requested"
            raise JobError(refusal)
        scheduler = self.ctx.scheduler
        if action == "stop":
            scheduler.stop(job.id)
        elif action == "cancel":
            scheduler.cancel(job.id)
        elif action == "save":
            scheduler.request_save(job.id)
        elif action == "resume":
            job = scheduler.resume(job.id)
        else:
            raise ValueError(f"unknown job action {action!r}")
        log.info("user %s: %s job %s", user.name, action, job.id)
        return self._summary(user, scheduler.get(job.id))


def _linked(source: Path, target: Path) -> Path:
    """`target` as a hard link to `source` (a copy across filesystems), renewed when the source is newer."""
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        target.parent.mkdir(exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(source)
        except OSError:  # another filesystem: a copy
            shutil.copyfile(source, target)
    return target
