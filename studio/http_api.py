"""The HTTP API and the UI's error handling: `StudioApi` published as stable, typed `gr.api`
endpoints. Every endpoint resolves `request.username` itself, because any endpoint can be called
directly whatever the page shows."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr

from studio.api import USER_ERRORS, StudioApi
from studio.auth import User


def _wrap(api: StudioApi, method: Callable[..., Any]) -> Callable[..., Any]:
    """Resolve the user of the request and turn user errors into gr.Error (shown in UI and API)."""
    @functools.wraps(method)
    def endpoint(*args: Any, request: gr.Request, **kwargs: Any) -> Any:
        try:
            user = api.user(getattr(request, "username", None))
            return method(user, *args, **kwargs)
        except USER_ERRORS as exc:
            raise gr.Error(api.redact(str(exc)), print_exception=False) from None

    return endpoint


def register_api(api: StudioApi) -> None:
    """Publish the stable HTTP API (inside an open gr.Blocks). Names are documented in docs/ui.md."""
    def call(name: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        gr.api(fn, api_name=name, concurrency_limit=None, **kwargs)

    def whoami(request: gr.Request) -> dict:
        """The signed-in user and whether they are an admin."""
        user = _wrap(api, lambda u: u)(request=request)
        return {"name": user.name, "admin": user.is_admin}

    def start_training(config_toml: str, gpus: str = "", num_gpus: int = 1, name: str = "",
                       request: gr.Request = None) -> dict:
        """Queue a training job from a TOML config (dataset inlined). gpus: '0,1' or '' for num_gpus."""
        return _wrap(api, api.start_training)(config_toml, gpus, num_gpus, name, request=request)

    def plan_training(config_toml: str, gpus: str = "", num_gpus: int = 1, card: str = "",
                      request: gr.Request = None) -> dict:
        """Pre-flight plan of a training TOML: peak GPU memory, host RAM, cache size, s/step, total time,
        fits or not, and the cheapest change that fits. card: plan for another card, e.g. 'RTX 4090:24'."""
        return _wrap(api, api.plan_training)(config_toml, gpus, num_gpus, card, request=request)

    def list_jobs(status: str = "", limit: int = 50, offset: int = 0, request: gr.Request = None) -> list[dict]:
        """Jobs visible to the caller, newest first; status: comma-separated filter, e.g. 'running,queued'."""
        statuses = [s.strip() for s in status.split(",") if s.strip()]
        return _wrap(api, api.list_jobs)(statuses, limit, offset, request=request)

    def job_status(job_id: int, request: gr.Request = None) -> dict:
        """One job: status, progress, ETA, saved LoRAs, failure reason."""
        return _wrap(api, api.job_status)(job_id, request=request)

    def job_metrics(job_id: int, max_points: int = 2000, request: gr.Request = None) -> dict:
        """Loss series of a job: lists step, loss, lr and epoch_steps."""
        return _wrap(api, api.job_metrics)(job_id, max_points, request=request)

    def job_samples(job_id: int, request: gr.Request = None) -> dict:
        """Sample videos drawn at each save ([sample]): label, step, seconds, videos with scores; the best save."""
        return _wrap(api, api.job_samples)(job_id, request=request)

    def job_log(job_id: int, request: gr.Request = None) -> str:
        """The last lines of a job's log."""
        return _wrap(api, api.job_log)(job_id, request=request)

    def control(action: str) -> Callable[..., dict]:
        def handler(job_id: int, request: gr.Request = None) -> dict:
            return _wrap(api, api.control_job)(job_id, action, request=request)

        handler.__doc__ = f"{action.capitalize()} a job; returns its new status."
        return handler

    def generate(prompt: str, model: str = "demo", loras: list[dict] | None = None, negative_prompt: str = "",
                 width: int | None = None, height: int | None = None, num_frames: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, flow_shift: float | None = None,
                 seed: int = -1, fps: int | None = None, num_videos: int = 1, fuse_loras: bool = False,
                 image: str | None = None, request: gr.Request = None) -> dict:
        """Queue a generation; loras: [{"lora": "job:ID/epochN" | "upload:NAME", "weight": 0.8}]; seed -1 =
        random. Sizes and sampling left out take the model's defaults (demo 64x64x17, 20 steps; Wan
        832x480x81, 30 steps; flow_shift the model's own), as in the UI and the CLI. image: the start image
        of an image-to-video model, as 'image:NAME' (from /upload_image or the Infer tab), or 'gallery:ID' (the
        start image a gallery item was made from, as /gallery_item's params.image names it)."""
        values = dict(prompt=prompt, model=model, loras=loras or [], negative_prompt=negative_prompt,
                      width=width, height=height, num_frames=num_frames, steps=steps,
                      guidance_scale=guidance_scale, flow_shift=flow_shift, seed=seed,
                      fps=fps, num_videos=num_videos, fuse_loras=fuse_loras, image=image)
        return _wrap(api, api.generate)(values, request=request)

    def upload_image(image: str, name: str = "image", request: gr.Request = None) -> dict:
        """Keep a start image among the caller's uploads: image as base64 or a data URL of a png, jpg or
        webp (at most 20 MB); returns {"image": "image:NAME"} for /generate."""
        return {"image": _wrap(api, api.upload_image_data)(image, name, request=request)}

    def generation_status(request_id: str, request: gr.Request = None) -> dict:
        """State (queued, waiting, loading, running, succeeded, failed, cancelled, lost), step, ETA, error,
        gallery_ids and, while waiting, waiting_for (which job or worker holds the devices)."""
        return _wrap(api, api.generation_status)(request_id, request=request)

    def list_generations(limit: int = 50, offset: int = 0, request: gr.Request = None) -> list[dict]:
        """Generation requests visible to the caller, newest first, with owner, state and error;
        they survive a restart (state "lost" when the studio stopped while one ran)."""
        return _wrap(api, api.list_generations)(limit, offset, request=request)

    def cancel_generation(request_id: str, request: gr.Request = None) -> dict:
        """Cancel a generation at its next denoising step."""
        return _wrap(api, api.cancel_generation)(request_id, request=request)

    def compare(prompt: str, compare_loras: list[str] | None = None, weights: list[float] | None = None,
                seeds: list[int] | None = None, model: str = "demo", loras: list[dict] | None = None,
                negative_prompt: str = "", width: int | None = None, height: int | None = None,
                num_frames: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                flow_shift: float | None = None, seed: int = -1, fps: int | None = None, image: str | None = None,
                request: gr.Request = None) -> dict:
        """Queue a comparison: one prompt and seed over LoRAs (rows: 'job:ID/epochN', 'job:ID/*' = every save
        of a run, 'upload:NAME', 'none' = without), weights of the compared LoRA and seeds (columns), at most
        16 videos, queued whole or not at all. loras: the rest of the stack, and image (every cell's start
        image), as /generate takes them. Returns
        {compare_id, state, rows, columns, cells: [{row, column, request_id, state, gallery_ids}]}."""
        values = dict(prompt=prompt, model=model, loras=loras or [], negative_prompt=negative_prompt, width=width,
                      height=height, num_frames=num_frames, steps=steps, guidance_scale=guidance_scale,
                      flow_shift=flow_shift, seed=seed, fps=fps, image=image)
        return _wrap(api, api.compare)(values, compare_loras or [], weights or [], seeds or [], request=request)

    def compare_status(compare_id: str, request: gr.Request = None) -> dict:
        """A comparison's state, progress and cells (each with its gallery_ids once done)."""
        return _wrap(api, api.compare_status)(compare_id, request=request)

    def cancel_compare(compare_id: str, request: gr.Request = None) -> dict:
        """Cancel every cell of a comparison that has not finished."""
        return _wrap(api, api.cancel_compare)(compare_id, request=request)

    def gallery_list(query: str = "", model: str = "", lora: str = "", favorite: bool = False, page: int = 1,
                     page_size: int = 24, request: gr.Request = None) -> dict:
        """Gallery items visible to the caller (newest first) with every parameter; {items, total, page}."""
        return _wrap(api, api.gallery_list)(query, model, lora, favorite, page, page_size, request=request)

    def gallery_item(item_id: str, request: gr.Request = None) -> dict:
        """One gallery item with every parameter."""
        return _wrap(api, api.gallery_item)(item_id, request=request)

    def gallery_favorite(item_id: str, value: bool = True, request: gr.Request = None) -> dict:
        """Mark or unmark a gallery item as favorite."""
        return _wrap(api, api.gallery_favorite)(item_id, value, request=request)

    def gallery_delete(item_id: str, request: gr.Request = None) -> dict:
        """Delete a gallery item and its files."""
        return _wrap(api, api.gallery_delete)(item_id, request=request)

    def check_dataset(folder: str = "", frame_buckets: str = "", config_toml: str = "",
                      request: gr.Request = None) -> dict:
        """The dataset preview the trainer follows: every file with its buckets or 'skipped: <reason>',
        samples per bucket, steps per epoch. A folder (+ frame buckets '1,33'), or a training TOML."""
        return _wrap(api, api.check_dataset)(folder, frame_buckets, config_toml, request=request)

    def gpu_status(request: gr.Request = None) -> dict:
        """GPUs (memory, utilization, temperature, power, job), host RAM and free disk."""
        return _wrap(api, api.gpu_status)(request=request)

    call("whoami", whoami)
    call("start_training", start_training)
    call("plan_training", plan_training)
    call("list_jobs", list_jobs)
    call("job_status", job_status)
    call("job_metrics", job_metrics)
    call("job_samples", job_samples)
    call("job_log", job_log)
    for action in ("stop", "cancel", "resume", "save"):
        call(f"{action}_job", control(action))
    call("generate", generate)
    call("upload_image", upload_image)
    call("generation_status", generation_status)
    call("cancel_generation", cancel_generation)
    call("list_generations", list_generations)
    call("compare", compare)
    call("compare_status", compare_status)
    call("cancel_compare", cancel_compare)
    call("gallery_list", gallery_list)
    call("gallery_item", gallery_item)
    call("gallery_favorite", gallery_favorite)
    call("gallery_delete", gallery_delete)
    call("gpu_status", gpu_status)
    call("check_dataset", check_dataset)


@contextmanager
def user_errors(api: StudioApi | None = None) -> Iterator[None]:
    """In UI handlers: show a user error as a Gradio error message instead of a stack trace (with
    `api`: without the data directory's location)."""
    try:
        yield
    except USER_ERRORS as exc:
        raise gr.Error(api.redact(str(exc)) if api is not None else str(exc), print_exception=False) from None


def request_user(api: StudioApi, request: gr.Request | None) -> User:
    with user_errors(api):
        return api.user(getattr(request, "username", None))
