"""The Infer tab's Compare section: the form's prompt, seed and settings rendered over checkpoints of a
run, LoRA weights or seeds (studio.compare), queued as one comparison and shown as a labelled grid
whose videos play in place; each video is also a gallery item carrying the comparison's id.

Handlers (api, user, inputs) -> outputs are unit-tested in tests/test_compare.py; `build` places the
section under the Infer form and wires it to the form's widgets (tabs.infer.InferHandles).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.api import StudioApi
from studio.auth import AccessDenied, User
from studio.compare import MAX_CELLS, NO_LORA, parse_axis
from studio.files import link_epoch, served_url
from studio.http_api import request_user, user_errors
from studio.widgets import LoraStack, message, progress_bar
from tabs.infer import InferHandles, form_request, with_start_image


# ---- handlers ----------------------------------------------------------------------------------------
def compare_lora_choices(api: StudioApi, user: User) -> list[tuple[str, str]]:
    """Rows to compare: the base model, every save of a run at once, or single saves and uploads."""
    runs = [(f"#{j['id']} {j['name']} · every save", f"job:{j['id']}/*") for j in api.list_jobs(user, limit=50)
            if j.get("kind") == "train" and api.job_lora_files(user, j["id"])]
    return [("none · the base model", NO_LORA), *runs, *api.lora_choices(user)]


def start_compare(api: StudioApi, user: User, request: dict[str, Any], loras: list[str] | None, weights: str,
                  seeds: str) -> tuple[str, str]:
    """Queue the comparison (the form's start image, if any, kept once: every cell starts from it);
    (its id, a note for the form)."""
    view = api.compare(user, with_start_image(api, user, request), loras or [], parse_axis(weights, float, "weights"),
                       parse_axis(seeds, int, "seeds"))
    cells = len(view["cells"])
    return view["compare_id"], message(f"comparison {view['compare_id']} queued: {cells} videos "
                                       f"({len(view['rows'])} x {len(view['columns'])})", "ok")


@dataclass
class CompareView:
    bar: str
    grid: str | None  # None: unchanged since the last signature
    sig: str
    final: bool


def compare_view(api: StudioApi, user: User, compare_id: str, last_sig: str = "") -> CompareView:
    """The comparison's progress and its grid (rows x columns), redrawn when a cell's state changed."""
    try:
        status = api.compare_status(user, compare_id)
    except AccessDenied:
        return CompareView(progress_bar(None, "comparison not found"), "", "", True)
    final = status["state"] not in ("queued", "running")
    fraction = status["step"] / status["total_steps"] if status["total_steps"] else None
    bar = progress_bar(1.0 if final and status["done"] else fraction,
                       f"{status['state']} · {status['done']}/{len(status['cells'])} videos")
    sig = f"{link_epoch()}:{compare_id}:" + ",".join(f"{c['state']}{c['gallery_ids']}" for c in status["cells"])
    return CompareView(bar, compare_grid(api, user, status) if sig != last_sig else None, sig, final)


def compare_grid(api: StudioApi, user: User, status: dict[str, Any]) -> str:
    by_cell = {(c["row"], c["column"]): c for c in status["cells"]}
    head = "".join(f"<th>{html.escape(column)}</th>" for column in status["columns"])
    rows = []
    for row in status["rows"]:
        cells = "".join(_cell(api, user, by_cell.get((row, column))) for column in status["columns"])
        rows.append(f"<tr><th class='compare-row'>{html.escape(row)}</th>{cells}</tr>")
    caption = (f"<div class='muted'>comparison {html.escape(status['compare_id'])} · "
               f"“{html.escape(status['prompt'][:120])}” · in the Gallery with compare_id "
               f"{html.escape(status['compare_id'])}</div>")
    return (f"{caption}<div class='compare-grid-wrap'><table class='compare-grid'><thead><tr><th></th>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")


def _cell(api: StudioApi, user: User, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "<td class='muted'>–</td>"
    if cell["state"] != "succeeded" or not cell["gallery_ids"]:
        note = cell["state"] + (f": {cell['error']}" if cell.get("error") else "")
        return f"<td class='muted'>{html.escape(note)}</td>"
    item = api.own_item(user, cell["gallery_ids"][0])
    return (f"<td><video src='{served_url(api.file_link(item.display_path))}' "
            f"poster='{served_url(api.file_link(item.poster_path))}' controls loop muted autoplay playsinline "
            f"preload='metadata'></video><div class='muted'>seed {item.seed} · {html.escape(item.id)}</div></td>")


# ---- widgets -----------------------------------------------------------------------------------------
def build(api: StudioApi, infer: InferHandles, timer: gr.Timer) -> None:
    """The Compare section; call inside the Infer tab, after tabs.infer.build."""
    with gr.Accordion(f"Compare: this prompt and seed over checkpoints, LoRA weights or seeds (up to {MAX_CELLS} "
                      "videos)", open=False, elem_id="compare-section"):
        with gr.Row(equal_height=True):
            loras = gr.Dropdown([], value=[], multiselect=True, label="LoRAs (rows)", scale=3, elem_id="compare-loras",
                                info="every save of a run, single saves, uploads, or none; others in the stack stay")
            weights = gr.Textbox(label="weights (columns)", placeholder="0, 0.5, 1", scale=1, elem_id="compare-weights")
            seeds = gr.Textbox(label="seeds (columns)", placeholder="1, 2, 3", scale=1, elem_id="compare-seeds")
        with gr.Row():
            start = gr.Button("Compare", variant="primary", scale=3, elem_id="compare-start")
            cancel = gr.Button("Cancel comparison", variant="stop", scale=1, elem_id="compare-cancel")
        note = gr.HTML(elem_id="compare-msg")
        bar = gr.HTML(progress_bar(None, "no comparison yet"), elem_id="compare-progress")
        grid = gr.HTML(elem_id="compare-grid")
    compare_id, sig = gr.State(None), gr.State("")
    params, stack = infer.params, infer.loras
    by_component = {component: name for name, component in params.items()}

    def on_focus(current: list[str] | None, request: gr.Request):
        return gr.update(choices=compare_lora_choices(api, request_user(api, request)), value=current or [])

    loras.focus(on_focus, loras, loras, queue=False, api_visibility="private")

    def on_start(values: dict, request: gr.Request):
        user = request_user(api, request)
        req = form_request({name: values[c] for c, name in by_component.items() if name != "num_videos"})
        req["loras"] = LoraStack.read(values[stack.visible], [values[c] for c in (*stack.refs, *stack.weights)])
        req["image"] = values[infer.start_image]
        with user_errors(api):
            cid, text = start_compare(api, user, req, values[loras], values[weights], values[seeds])
        return cid, text, progress_bar(0.0, "queued"), "", ""

    start.click(on_start, {*params.values(), stack.visible, *stack.refs, *stack.weights, infer.start_image, loras,
                           weights, seeds}, [compare_id, note, bar, grid, sig], api_visibility="private")

    def on_cancel(cid: str | None, request: gr.Request):
        user = request_user(api, request)
        if not cid:
            return message("no comparison to cancel", "info")
        with user_errors(api):
            api.cancel_compare(user, cid)
        return message(f"comparison {cid}: cancel requested", "ok")

    cancel.click(on_cancel, compare_id, note, api_visibility="private")

    def on_tick(cid: str | None, last: str, request: gr.Request):
        # A finished comparison is read again only when its video links near their expiry.
        if not cid or last.startswith(f"final:{link_epoch()}:"):
            return gr.skip(), gr.skip(), last
        view = compare_view(api, request_user(api, request), cid, last.removeprefix("final:"))
        return view.bar, gr.skip() if view.grid is None else view.grid, ("final:" if view.final else "") + view.sig

    timer.tick(on_tick, [compare_id, sig], [bar, grid, sig], queue=False, show_progress="hidden",
               api_visibility="private")
