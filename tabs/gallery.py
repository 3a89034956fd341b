"""The Gallery tab: a grid of generated videos, search and filters, details, reuse, favorite, delete."""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.api import StudioApi
from studio.auth import User
from studio.context import StudioContext
from studio.http_api import request_user, user_errors
from studio.widgets import LoraStack, message, timing_parts
from tabs.infer import InferHandles
from tabs.timers import TabTimers

PAGE_SIZE = 24
TAB_LABEL = "Gallery"  # the tab's label in studio.shell
TAB_ID = "gallery"


def _caption(item: dict[str, Any]) -> str:
    """The LoRA mix first, each weight before its name: a caption cut after a dozen characters still
    tells a weight-1 video from a weight-0 one."""
    star = "★ " if item.get("favorite") else ""
    loras = " + ".join(f"{l.get('weight', 1):g}× {l.get('name', '?')}" for l in item.get("loras") or [])
    return f"{star}" + (f"[{loras}] " if loras else "") + item["prompt"][:80]


HIDDEN_PARAMS = {"prompt", "negative_prompt", "loras", "lora_files", "model_path"}


def _details(item: dict[str, Any]) -> str:
    """Every parameter of an item as a two-column HTML table (server paths left out)."""
    rows = [("id", item["id"]), ("owner", item["owner"]),
            ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["created_at"]))),
            ("model", item["model"]), ("prompt", item["prompt"]), ("negative prompt", item["negative_prompt"] or "—"),
            ("seed", item["seed"]), ("size", f"{item['width']}×{item['height']}, {item['num_frames']} frames @ "
                                            f"{item['fps']} fps")]
    for lora in item.get("loras") or []:
        rows.append(("LoRA", f"{lora.get('name', '?')} × {lora.get('weight', 1):g}"))
    for key, value in sorted((item.get("params") or {}).items()):
        if key not in HIDDEN_PARAMS and key not in {"model", "seed", "width", "height", "num_frames", "fps"}:
            rows.append((key.replace("_", " "), value))
    timings = item.get("timings") or {}
    if timings:
        rows.append(("timings (s)", ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in timing_parts(timings))))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='details'>{body}</table>"


# ---- handlers: (api, user, inputs) -> outputs, unit-tested in tests/test_gallery_tab.py -----------
@dataclass
class GalleryPage:
    media: list[tuple[str, str]]  # (poster or video file, caption)
    ids: list[str]
    info: str
    signature: str  # unchanged signature: the grid need not be redrawn


def gallery_page(api: StudioApi, user: User, query: str, model: str, lora: str, favorites: bool, only_mine: bool,
                 page: int) -> GalleryPage:
    result = api.gallery_list(user, query, model, lora, favorites, page, PAGE_SIZE, all_users=not only_mine)
    items = result["items"]
    pages = max(1, -(-result["total"] // PAGE_SIZE))
    media = []
    for item in items:
        record = api.own_item(user, item["id"])
        # Posters keep the grid light; the selected video plays in the detail panel.
        shown = record.poster_path if record.poster_path.is_file() else record.video_path
        media.append((api.file_link(shown), _caption(item)))
    signature = json.dumps([[i["id"], i.get("favorite")] for i in items]) + f"{page}/{pages}"
    return GalleryPage(media, [i["id"] for i in items], f"page {page} of {pages} · {result['total']} videos",
                       signature)


def item_view(api: StudioApi, user: User, item_id: str) -> tuple[str, str, str]:
    """(video file, details table, favorite button label) of one item."""
    item = api.gallery_item(user, item_id)
    record = api.own_item(user, item_id)
    return api.file_link(record.display_path), _details(item), "★ Unfavorite" if item["favorite"] else "☆ Favorite"


def _selected(item_id: str | None) -> str:
    if not item_id:
        raise ValueError("select a video first")
    return item_id


def toggle_favorite(api: StudioApi, user: User, item_id: str | None) -> bool:
    item = api.gallery_item(user, _selected(item_id))
    return api.gallery_favorite(user, item_id, not item["favorite"])["favorite"]


def delete_item(api: StudioApi, user: User, item_id: str | None) -> str:
    api.gallery_delete(user, _selected(item_id))
    return message(f"deleted {item_id}", "ok")


@dataclass
class Reuse:
    """An item's settings for the Infer form."""

    values: list[Any]  # of the form's fields, in the order asked
    loras: list[dict[str, Any]]  # the LoRA stack, by the picker's references
    missing: list[str]  # LoRAs no longer there
    start_image: str | None  # a link to the start image it was made from (image-to-video), else None


def reuse_values(api: StudioApi, user: User, item_id: str | None, names: list[str]) -> Reuse:
    """An item's settings for the Infer form, its start image included (None clears the form's)."""
    record = api.own_item(user, _selected(item_id))
    params = dict(record.params or {})
    values = [record.seed if name == "seed" else params.get(name, getattr(record, name, None)) for name in names]
    loras, missing = [], []
    for lora in record.loras or []:
        reference = api.lora_reference(user, lora.get("path", ""))
        if reference:
            loras.append({"lora": reference, "weight": lora.get("weight", 1.0)})
        else:
            missing.append(str(lora.get("name")))
    image = record.start_image
    return Reuse(values, loras, missing, api.file_link(image) if image is not None else None)


def build(ctx: StudioContext, api: StudioApi, infer: InferHandles, tabs: gr.Tabs,
          timers: TabTimers) -> dict[str, list]:
    with gr.Row(equal_height=True):
        query = gr.Textbox(label="Search prompts", placeholder="e.g. purple star", scale=4, elem_id="gallery-search")
        model_filter = gr.Textbox(label="Model", placeholder="any", scale=2)
        lora_filter = gr.Textbox(label="LoRA", placeholder="any", scale=2)
        favorites = gr.Checkbox(label="Favorites only", scale=1, min_width=120)
        mine = gr.Checkbox(label="Only mine", scale=1, min_width=100)
        refresh = gr.Button("Refresh", size="sm", scale=1)
    with gr.Row(equal_height=False):
        with gr.Column(scale=6):
            grid = gr.Gallery(label="Videos", columns=4, height="auto", allow_preview=False, preview=False,
                              elem_id="gallery-grid", object_fit="contain")
            with gr.Row():
                prev_page = gr.Button("◀ Prev", size="sm")
                page_info = gr.Markdown("", elem_id="gallery-page")
                next_page = gr.Button("Next ▶", size="sm")
        with gr.Column(scale=4, elem_classes=["panel"]):
            video = gr.Video(label="Selected", interactive=False, autoplay=True, loop=True, elem_id="gallery-video")
            details = gr.HTML(elem_id="gallery-details")
            with gr.Row():
                reuse = gr.Button("Reuse in Infer", size="sm", variant="primary", elem_id="gallery-reuse")
                favorite = gr.Button("☆ Favorite", size="sm", elem_id="gallery-favorite")
                delete = gr.Button("Delete", size="sm", variant="stop", elem_id="gallery-delete")
            download = gr.File(label="Download", interactive=False, height=80)
            note = gr.HTML()
    page = gr.State(1)
    ids = gr.State([])
    selected = gr.State(None)
    listing_sig = gr.State("")
    timer = timers.new(TAB_ID, max(3.0, ctx.settings.poll_interval_s * 3))
    filters = [query, model_filter, lora_filter, favorites, mine, page]

    def load(q: str, m: str, l: str, fav: bool, only_mine: bool, pg: int, last_sig: str, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            found = gallery_page(api, user, q, m, l, fav, only_mine, pg)
        if found.signature == last_sig:
            return gr.skip(), gr.skip(), gr.skip(), last_sig
        return found.media, found.ids, found.info, found.signature

    listing = dict(inputs=[*filters, listing_sig], outputs=[grid, ids, page_info, listing_sig],
                   api_visibility="private")
    for trigger in (query.submit, model_filter.submit, lora_filter.submit, favorites.change, mine.change,
                    refresh.click):
        trigger(lambda: 1, None, page, queue=False, api_visibility="private").then(load, **listing)
    timer.tick(load, queue=False, show_progress="hidden", **listing)

    def on_tab(q: str, m: str, l: str, fav: bool, only_mine: bool, pg: int, last_sig: str, evt: gr.SelectData,
               request: gr.Request):
        # The grid at once when the tab opens, not at the timer's next tick.
        if evt.value != TAB_LABEL:
            return gr.skip(), gr.skip(), gr.skip(), last_sig
        return load(q, m, l, fav, only_mine, pg, last_sig, request)

    tabs.select(on_tab, queue=False, show_progress="hidden", **listing)

    def turn(delta: int):
        return lambda pg: max(1, pg + delta)

    prev_page.click(turn(-1), page, page, queue=False, api_visibility="private").then(load, **listing)
    next_page.click(turn(1), page, page, queue=False, api_visibility="private").then(load, **listing)

    def show(item_id: str | None, request: gr.Request):
        user = request_user(api, request)
        if not item_id:
            return None, "", gr.update(value="☆ Favorite"), None
        with user_errors(api):
            video_file, table, star = item_view(api, user, item_id)
        return video_file, table, gr.update(value=star), video_file

    def pick(id_list: list[str], evt: gr.SelectData):
        return id_list[evt.index] if evt.index is not None and evt.index < len(id_list) else None

    grid.select(pick, ids, selected, queue=False, api_visibility="private").then(
        show, selected, [video, details, favorite, download], api_visibility="private")
    # "Open in Gallery" under a finished generation in the Infer tab.
    to_gallery = infer.open_in_gallery.click(lambda item_id: (item_id, gr.Tabs(selected=TAB_ID)), infer.last_item,
                                             [selected, tabs], queue=False, api_visibility="private")
    to_gallery.then(
        show, selected, [video, details, favorite, download], api_visibility="private")

    def on_favorite(item_id: str | None, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            toggle_favorite(api, user, item_id)
        return ""

    favorite.click(on_favorite, selected, note, api_visibility="private").then(
        show, selected, [video, details, favorite, download], api_visibility="private").then(load, **listing)

    def on_delete(item_id: str | None, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            note_html = delete_item(api, user, item_id)
        return None, None, "", None, note_html

    delete.click(on_delete, selected, [selected, video, details, download, note], api_visibility="private").then(
        load, **listing)

    # "Reuse in Infer": fill the Infer tab's widgets and switch to it.
    infer_params = infer.params
    stack = infer.loras

    def on_reuse(item_id: str | None, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            reused = reuse_values(api, user, item_id, list(infer_params))
        filled = LoraStack.fill(reused.loras)
        n = len(stack.refs)
        refs = [gr.update(choices=api.lora_choices(user), value=v) for v in filled[1:1 + n]]
        notice = message(f"LoRA no longer available: {', '.join(reused.missing)}", "error") if reused.missing else ""
        return [*reused.values, filled[0], *refs, *filled[1 + n:], reused.start_image, gr.Tabs(selected=infer.tab_id),
                notice]

    to_infer = reuse.click(on_reuse, selected,
                           [*infer_params.values(), stack.visible, *stack.refs, *stack.weights, *stack.rows,
                            infer.start_image, tabs, note], api_visibility="private")
    return {TAB_ID: [to_gallery], infer.tab_id: [to_infer]}  # events that switch tabs (their timers follow)
