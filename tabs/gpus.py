"""The Gpus tab."""
from __future__ import annotations

import gradio as gr

from studio.context import StudioContext


def build(ctx: StudioContext) -> None:
    gr.Markdown("Gpus: coming soon.")
