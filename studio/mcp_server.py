"""The studio as an MCP server, for agents: the same authorised actions as the HTTP API (`StudioApi`),
as one studio user, over stdio (`python -m studio mcp --user NAME`; an MCP client starts it).

Tools: check a config or a dataset, start / watch / stop / resume / save training jobs, read a job's
log, metrics, samples and best save, generate videos and follow them, browse the gallery, see the
GPUs. Every tool answers JSON; a refused action is a tool error with the studio's own message
(`job id must be a whole number, got 1.5`), never a traceback.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError  # an anticipated failure: its text reaches the agent

from studio.api import USER_ERRORS, StudioApi
from studio.auth import User

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Video LoRA Studio: train LoRA adapters for Wan video models and generate videos with them. "
    "Check a training TOML with check_config and its dataset with check_dataset before start_training; "
    "follow a job with job_status (progress, loss, samples, best save); generate with generate and poll "
    "generation_status; results land in the gallery (gallery_list)."
)


def _as_tool_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def tool(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise ToolError(str(exc)) from None

    return tool


def build_server(api: StudioApi, user: User) -> MCPServer:
    server = MCPServer(name="video-lora-studio", instructions=INSTRUCTIONS)

    def tool(fn: Callable[..., Any]) -> Callable[..., Any]:
        return server.tool()(_as_tool_errors(fn))

    @tool
    def whoami() -> dict[str, Any]:
        """The studio user this server acts as."""
        return {"name": user.name, "admin": user.is_admin}

    @tool
    def check_config(config_toml: str) -> dict[str, Any]:
        """Validate a training TOML (diffusion-pipe shape): the warnings for keys mapped or ignored."""
        cfg = api.prepare_config(user, config_toml)
        return {"ok": True, "warnings": list(cfg.warnings)}

    @tool
    def check_dataset(folder: str = "", frame_buckets: str = "", config_toml: str = "") -> dict[str, Any]:
        """Preview a dataset as the trainer will take it: every file with its buckets or why it is
        skipped, samples per bucket, steps per epoch. Give a folder or a training TOML."""
        return api.check_dataset(user, folder, frame_buckets, config_toml)

    @tool
    def start_training(config_toml: str, gpus: str = "", num_gpus: int = 1, name: str = "") -> dict[str, Any]:
        """Queue a training job from a TOML config. gpus: '0,1' for those GPUs, else num_gpus of any."""
        return api.start_training(user, config_toml, gpus, num_gpus, name)

    @tool
    def list_jobs(status: str = "", limit: int = 20) -> list[dict[str, Any]]:
        """Jobs visible to this user, newest first; status filters, e.g. 'running,queued'."""
        statuses = [s.strip() for s in status.split(",") if s.strip()]
        return api.list_jobs(user, statuses or None, limit)

    @tool
    def job_status(job_id: int) -> dict[str, Any]:
        """A job's state, progress, loss, failure reason and hint, its saves, samples and best save."""
        status = api.job_status(user, job_id)
        series = api.job_metrics(user, job_id, max_points=50)
        return {**status, "samples": series.get("samples", []), "best_save": series.get("best"),
                "eval": series.get("eval", {})}

    @tool
    def job_log(job_id: int, lines: int = 80) -> str:
        """The last lines of a job's log."""
        return "\n".join(api.job_log(user, job_id).splitlines()[-max(1, min(lines, 2000)):])

    @tool
    def control_job(job_id: int, action: str) -> dict[str, Any]:
        """action: stop, cancel (a queued job), resume (a stopped/failed/lost one) or save (a LoRA now)."""
        return api.control_job(user, job_id, action)

    @tool
    def generate(prompt: str, model: str = "demo", negative_prompt: str = "", width: int | None = None,
                 height: int | None = None, num_frames: int | None = None, steps: int | None = None,
                 seed: int | None = None, loras: list[dict[str, Any]] | None = None,
                 image: str | None = None) -> dict[str, Any]:
        """Queue a video. model: 'demo' or a local diffusers folder; sizes left out take the model's
        defaults; loras: [{"lora": "job:ID/epochN" or "upload:NAME", "weight": 1.0}]. image: the start
        image of an image-to-video model: 'image:NAME' of an upload, 'gallery:ID' (the one a gallery video
        was made from), or a png/jpg as base64 or a data URL."""
        request = {"prompt": prompt, "model": model, "negative_prompt": negative_prompt, "width": width,
                   "height": height, "num_frames": num_frames, "steps": steps, "seed": seed, "loras": loras or [],
                   "image": api.image_reference(user, image)}
        return api.generate(user, request)

    @tool
    def generation_status(request_id: str) -> dict[str, Any]:
        """A generation's state and progress; when it succeeded, its gallery item ids."""
        return api.generation_status(user, request_id)

    @tool
    def compare(prompt: str, compare_loras: list[str] | None = None, weights: list[float] | None = None,
                seeds: list[int] | None = None, model: str = "demo", seed: int | None = None,
                loras: list[dict[str, Any]] | None = None, image: str | None = None) -> dict[str, Any]:
        """Queue a comparison of one prompt and seed over LoRAs ('job:ID/epochN', 'job:ID/*' = every save
        of a run, 'none' = without), weights and seeds: at most 16 videos, shown as rows x columns. image:
        the start image every cell starts from, as generate takes it."""
        request = {"prompt": prompt, "model": model, "seed": seed, "loras": loras or [],
                   "image": api.image_reference(user, image)}
        return api.compare(user, request, compare_loras or [], weights or [], seeds or [])

    @tool
    def compare_status(compare_id: str) -> dict[str, Any]:
        """A comparison's state and cells (row, column, state, gallery item ids)."""
        return api.compare_status(user, compare_id)

    @tool
    def gallery_list(query: str = "", page: int = 1) -> dict[str, Any]:
        """Generated videos visible to this user, newest first (prompt, model, LoRAs, seed, timings)."""
        return api.gallery_list(user, query=query, page=page)

    @tool
    def gpu_status() -> dict[str, Any]:
        """GPUs (or CPU slots), what holds each, and the queue."""
        return api.gpu_status(user)

    return server


def serve(api: StudioApi, username: str | None) -> None:
    """Run until the client closes stdin."""
    user = api.user(username)
    log.info("MCP server acting as %s", user.name)
    build_server(api, user).run("stdio")
