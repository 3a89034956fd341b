"""The Blocks app: four tabs, and the one place that knows Gradio's launch arguments."""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.context import StudioContext
from tabs import gallery, gpus, infer, train

TITLE = "Video LoRA Studio"


def build_app(ctx: StudioContext) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}")
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train.build(ctx)
            with gr.Tab("Infer", id="infer"):
                infer.build(ctx)
            with gr.Tab("Gallery", id="gallery"):
                gallery.build(ctx)
            with gr.Tab("GPUs", id="gpus"):
                gpus.build(ctx)
    return app


def launch_kwargs(ctx: StudioContext) -> dict[str, Any]:
    settings = ctx.settings
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "max_file_size": f"{settings.max_upload_mb}mb",
        "show_error": True,
    }
