"""The Blocks app: four tabs, the HTTP API, and the one place that knows Gradio's launch arguments."""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine.paths import REPO_ROOT
from studio.api import StudioApi
from studio.http_api import register_api, request_user
from studio.context import StudioContext
from studio.files import serve_links_in_place
from tabs import compare, gallery, gpus, infer, train
from tabs.infer import InferHandles
from tabs.timers import TabTimers

TITLE = "Video LoRA Studio"
CSS_FILE = REPO_ROOT / "assets" / "studio.css"
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", radius_size="md",
                       font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(ctx: StudioContext) -> gr.Blocks:
    api = StudioApi(ctx)
    serve_links_in_place(ctx.layout.served_dir)
    with gr.Blocks(title=TITLE) as app:
        with gr.Row(equal_height=True):
            gr.Markdown(f"# {TITLE}\nTrain Wan video LoRAs with DeepSpeed, generate, compare.", elem_id="studio-title")
            who = gr.Markdown(elem_id="studio-user")
        timers = TabTimers(first_tab=train.TAB_ID)
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id=train.TAB_ID, elem_id="tab-train") as train_tab:
                train.build(ctx, api, timers)
            with gr.Tab("Infer", id=InferHandles.tab_id, elem_id="tab-infer") as infer_tab:
                infer_handles = infer.build(ctx, api, timers)
                compare.build(api, infer_handles, timers.new(InferHandles.tab_id, ctx.settings.poll_interval_s))
            with gr.Tab(gallery.TAB_LABEL, id=gallery.TAB_ID, elem_id="tab-gallery") as gallery_tab:
                switches = gallery.build(ctx, api, infer_handles, tabs, timers)
            with gr.Tab(gpus.TAB_LABEL, id=gpus.TAB_ID, elem_id="tab-gpus") as gpus_tab:
                gpus.build(ctx, api, timers, tabs)
        timers.wire([train_tab, infer_tab, gallery_tab, gpus_tab], switches)
        register_api(api)

        def whoami(request: gr.Request) -> str:
            user = request_user(api, request)
            if not ctx.accounts.enabled:
                return "<div style='text-align:right' class='muted'>single-user mode (no login)</div>"
            role = " (admin)" if user.is_admin else ""
            return (f"<div style='text-align:right'>signed in as <b>{user.name}</b>{role} · "
                    f"<a href='/logout'>log out</a></div>")

        app.load(whoami, None, who, queue=False, api_visibility="private")
    return app


def launch_kwargs(ctx: StudioContext) -> dict[str, Any]:
    settings = ctx.settings
    layout = ctx.layout
    kwargs: dict[str, Any] = {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "max_file_size": f"{settings.max_upload_mb}mb",
        "show_error": True,
        "theme": THEME,
        "css_paths": [CSS_FILE],
        # Only expiring links that handlers hand out after checking the owner (studio.files): never
        # the runs or gallery trees, whose folder names can be guessed.
        "allowed_paths": [str(layout.served_dir)],
        "blocked_paths": [str(layout.db_path), str(layout.logs_dir)],
        "footer_links": ["api"],
    }
    if ctx.accounts.users_file is not None:
        kwargs["auth"] = ctx.accounts.users_file.check
        kwargs["auth_message"] = "Video LoRA Studio: sign in (accounts: python -m studio users add NAME)"
        kwargs["blocked_paths"].append(str(ctx.accounts.users_file.path.resolve()))
    return kwargs
