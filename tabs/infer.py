"""The Infer tab: base model, LoRA stack, generation parameters, Generate with progress and Cancel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.inference.request import LIMITS, request_defaults
from engine.inference.tracking import TERMINAL_STATES
from studio.api import StudioApi
from studio.auth import AccessDenied, User
from studio.context import StudioContext
from studio.http_api import request_user, user_errors
from studio.widgets import LoraStack, message, progress_bar, scroll_into_sight, timings_table
from tabs.timers import TabTimers

TERMINAL = TERMINAL_STATES  # "lost" included: a request the studio lost ends the polling too
DEMO = request_defaults("demo")  # the form starts on the demo model


def form_request(values: dict[str, Any]) -> dict[str, Any]:
    """The Infer form's values as a generation request: seed -1 or empty = random, flow shift 0 or
    empty = the model's own, whole numbers as ints (number boxes hand over floats)."""
    req = dict(values)
    req["seed"] = None if req.get("seed") is None or req["seed"] < 0 else int(req["seed"])
    req["flow_shift"] = req.get("flow_shift") or None
    for key in ("width", "height", "num_frames", "fps", "steps", "num_videos"):
        req[key] = int(req[key]) if req.get(key) is not None else None
    return req


@dataclass
class GenerationView:
    """What the result panel shows for a request; `final` once it ended."""

    bar: str
    final: bool
    video: str | None = None
    link: str = ""
    error: str = ""
    timings: dict[str, Any] | None = None
    item_id: str | None = None


def with_start_image(api: StudioApi, user: User, req: dict[str, Any]) -> dict[str, Any]:
    """The form's start image (a temporary file of the upload, or the link a reused gallery item put there)
    kept among the user's uploads, by reference; Generate and Compare both send it this way."""
    if req.get("image"):
        req = {**req, "image": api.upload_image(user, req["image"])}
    return req


def generation_view(api: StudioApi, user: User, request_id: str) -> GenerationView:
    try:
        status = api.generation_status(user, request_id)
    except AccessDenied:  # forgotten after a restart, or not this user's
        return GenerationView(progress_bar(None, "request not found"), final=True)
    state, total = status["state"], status.get("total_steps") or 0
    text = f"{state} · step {status.get('step', 0)}/{total}" if total else state
    if status.get("eta_s") and state == "running":
        text += f" · ETA {status['eta_s']:.0f}s"
    if status.get("waiting_for"):  # never "queued" without a reason
        text += f" · {status['waiting_for']}"
    if state not in TERMINAL:
        return GenerationView(progress_bar(status.get("step", 0) / total if total else None, text), final=False)
    if state != "succeeded":
        error = status.get("error") or state
        return GenerationView(progress_bar(None, f"{state}: {status.get('error') or ''}"), final=True,
                              error=message(error, "error"))
    item_id = status["gallery_ids"][0]
    item = api.own_item(user, item_id)
    return GenerationView(progress_bar(1.0, f"done · seed {item.seed}"), final=True, video=api.file_link(item.display_path),
                          link=f"<span class='gallery-link'>Gallery entry {item_id} (seed {item.seed})</span>",
                          timings=status.get("timings"), item_id=item_id)


def queued_notice(answer: dict[str, Any]) -> str:
    """The notice under Generate from the generate answer: queued, with its warning (a long CPU estimate)
    when it has one."""
    request_id, warning = answer["request_id"], answer.get("warning")
    if warning:
        return message(f"request {request_id} queued; {warning}", "info")
    return message(f"request {request_id} queued", "ok")


LORA_REFERENCE_PREFIXES = ("job:", "upload:")  # the picker's values (studio.api_media.lora_choices)


def check_lora_picks(api: StudioApi, user: User, loras: list[dict[str, Any]]) -> None:
    """Refuse, in the form's words, a LoRA typed into a picker that is none of the user's saves or uploads
    (the API's own message names its reference syntax, which this form never shows)."""
    known = {reference for _, reference in api.lora_choices(user)}
    for number, lora in enumerate(loras, 1):
        # A reference the picker once offered (a run beyond its list, a reused gallery item) goes on to the API.
        if lora["lora"] not in known and not str(lora["lora"]).startswith(LORA_REFERENCE_PREFIXES):
            raise ValueError(f"LoRA {number}: {lora['lora']!r} is not one of your saved or uploaded LoRAs; "
                             "pick one from its list, or upload a .safetensors file")


def cancel_generation(api: StudioApi, user: User, request_id: str | None) -> str:
    if not request_id:
        return message("nothing to cancel", "info")
    return message(f"cancel requested ({api.cancel_generation(user, request_id)['state']})", "ok")


def stack_with_upload(api: StudioApi, user: User, file: str, loras: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LoRA stack with an uploaded .safetensors added at weight 1 (checked, stored per user)."""
    return [*loras, {"lora": api.upload_lora(user, file), "weight": 1.0}]


@dataclass
class InferHandles:
    """Components other tabs fill ("reuse in Infer" from the Gallery) or read (Compare)."""

    params: dict[str, gr.components.Component]
    loras: LoraStack
    start_image: gr.Image
    open_in_gallery: gr.Button
    last_item: gr.State
    tab_id: str = "infer"


def build(ctx: StudioContext, api: StudioApi, timers: TabTimers) -> InferHandles:
    def limits(name: str) -> dict[str, float]:
        low, high = LIMITS[name]
        return {"minimum": low, "maximum": high}

    def bounds(name: str) -> dict[str, str]:
        # Shown, not enforced here: Gradio's own refusal would not name the field; the request's does.
        low, high = LIMITS[name]
        return {"info": f"{low:g}–{high:g}"}

    with gr.Row(equal_height=False):
        with gr.Column(scale=5, elem_classes=["panel"]):
            gr.Markdown("### Generate")
            model = gr.Dropdown(["demo"], value="demo", allow_custom_value=True, label="Base model",
                                info="'demo' or a local diffusers folder (with model_index.json)", elem_id="infer-model")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="infer-prompt",
                                value="a purple star moving right on a white background")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            gr.Markdown("**LoRA stack** (trained runs by save, or uploaded .safetensors; weights mix)")
            stack = LoraStack.build()
            upload = gr.UploadButton("Upload a LoRA (.safetensors)", file_types=[".safetensors"], size="sm")
            start_image = gr.Image(None, type="filepath", sources=["upload"], height=160, elem_id="infer-image",
                                   label="Start image (image-to-video models: Wan I2V, TI2V-5B)")
            with gr.Accordion("Parameters", open=True, elem_classes=["form-section"]):
                with gr.Row(elem_classes=["form-grid"]):
                    width = gr.Number(DEMO["width"], precision=0, step=16, label="width", elem_id="infer-width", **bounds("width"), min_width=120)
                    height = gr.Number(DEMO["height"], precision=0, step=16, label="height", elem_id="infer-height", **bounds("height"), min_width=120)
                    frames = gr.Number(DEMO["num_frames"], precision=0, step=4, label="frames (4k+1)", elem_id="infer-frames", **bounds("num_frames"),
                                       min_width=120)
                    fps = gr.Number(DEMO["fps"], precision=0, label="fps", **bounds("fps"), min_width=120)
                with gr.Row(elem_classes=["form-grid"]):
                    steps = gr.Slider(value=DEMO["steps"], step=1, label="steps", elem_id="infer-steps", **limits("steps"))
                    guidance = gr.Slider(value=DEMO["guidance_scale"], step=0.5, label="guidance scale", **limits("guidance_scale"))
                    shift = gr.Number(None, step=0.1, label="flow shift (0 or empty: the model's own)",
                                      minimum=0, maximum=LIMITS["flow_shift"][1], min_width=120)
                with gr.Row(elem_classes=["form-grid"]):
                    seed = gr.Number(-1, precision=0, label="seed (-1 = random)", elem_id="infer-seed", min_width=140)
                    count = gr.Number(1, precision=0, label="videos", **bounds("num_videos"), min_width=120)
                fuse = gr.Checkbox(False, label="fuse LoRAs (faster, fixed weights)")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="infer-generate", scale=3)
                cancel = gr.Button("Cancel", variant="stop", elem_id="infer-cancel", scale=1)
            request_msg = gr.HTML()
        with gr.Column(scale=4, elem_classes=["panel"], elem_id="infer-result"):
            gr.Markdown("### Result")
            progress = gr.HTML(progress_bar(None, "idle"), elem_id="infer-progress")
            video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, elem_id="infer-video")
            with gr.Row(equal_height=True):
                gallery_link = gr.HTML(elem_id="infer-gallery-link")
                open_in_gallery = gr.Button("Open in Gallery", size="sm", visible=False, scale=0, min_width=140,
                                            elem_id="infer-open-gallery")
            timings = gr.HTML(elem_id="infer-timings")
    request_id = gr.State(None)
    shown = gr.State(None)
    last_item = gr.State(None)
    timer = timers.new(InferHandles.tab_id, ctx.settings.poll_interval_s)

    params = {"model": model, "prompt": prompt, "negative_prompt": negative, "width": width, "height": height,
              "num_frames": frames, "fps": fps, "steps": steps, "guidance_scale": guidance, "flow_shift": shift,
              "seed": seed, "num_videos": count, "fuse_loras": fuse}
    by_component = {component: name for name, component in params.items()}

    def refresh_loras(request: gr.Request):
        user = request_user(api, request)
        choices = api.lora_choices(user)
        return [gr.update(choices=choices) for _ in stack.refs]

    stack.add.click(refresh_loras, None, stack.refs, queue=False, api_visibility="private")

    # `request` first: Gradio injects it by position, which it cannot do after `*values`.
    def add_upload(request: gr.Request, file: str | None, count: int, *values: Any):
        user = request_user(api, request)
        if not file:
            return gr.skip()
        with user_errors(api):
            loras = stack_with_upload(api, user, file, LoraStack.read(count, list(values)))
        filled = LoraStack.fill(loras)
        n = len(stack.refs)
        refs = [gr.update(choices=api.lora_choices(user), value=v) for v in filled[1:1 + n]]
        return [filled[0], *refs, *filled[1 + n:]]

    upload.upload(add_upload, [upload, stack.visible, *stack.refs, *stack.weights],
                  [stack.visible, *stack.refs, *stack.weights, *stack.rows], api_visibility="private")

    def submit(values: dict, request: gr.Request):
        user = request_user(api, request)
        lora_values = [values[c] for c in (*stack.refs, *stack.weights)]
        req = form_request({name: values[c] for c, name in by_component.items()})
        req["loras"] = LoraStack.read(values[stack.visible], lora_values)
        req["image"] = values[start_image]
        with user_errors(api):
            check_lora_picks(api, user, req["loras"])
            answer = api.generate(user, with_start_image(api, user, req))
        # The previous result goes: what shows belongs to this request.
        return (answer["request_id"], progress_bar(0.0, "queued"), "", queued_notice(answer), gr.update(visible=False),
                None, "")

    # Queued: bring the progress and the coming video into sight.
    generate.click(submit, {*params.values(), stack.visible, *stack.refs, *stack.weights, start_image},
                   [request_id, progress, gallery_link, request_msg, open_in_gallery, video, timings],
                   api_visibility="private").success(None, js=scroll_into_sight("#infer-result"))

    def stop(rid: str | None, request: gr.Request):
        user = request_user(api, request)
        with user_errors(api):
            return cancel_generation(api, user, rid)

    cancel.click(stop, request_id, request_msg, api_visibility="private")

    def poll(rid: str | None, last_shown: str | None, request: gr.Request):
        user = request_user(api, request)
        if not rid or rid == last_shown:
            return (*(gr.skip(),) * 4, last_shown, gr.skip(), gr.skip())
        view = generation_view(api, user, rid)
        if not view.final:
            return view.bar, gr.skip(), gr.skip(), gr.skip(), last_shown, gr.skip(), gr.skip()
        if view.item_id is None:  # failed, cancelled or gone
            return view.bar, gr.skip(), view.error or gr.skip(), gr.skip(), rid, gr.skip(), gr.skip()
        return (view.bar, view.video, view.link, timings_table(view.timings), rid, view.item_id,
                gr.update(visible=True))

    timer.tick(poll, [request_id, shown],
               [progress, video, gallery_link, timings, shown, last_item, open_in_gallery], queue=False,
               show_progress="hidden", api_visibility="private")
    return InferHandles(params=params, loras=stack, start_image=start_image, open_in_gallery=open_in_gallery,
                        last_item=last_item)
