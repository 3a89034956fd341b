"""The Infer tab: base model, LoRA stack, generation parameters, Generate with progress and Cancel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.inference.request import LIMITS, request_defaults
from studio.api import StudioApi
from studio.http_api import request_user, user_errors
from studio.context import StudioContext
from studio.widgets import LoraStack, message, progress_bar

TERMINAL = {"succeeded", "failed", "cancelled"}
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
class InferHandles:
    """Components other tabs fill ("reuse in Infer" from the Gallery)."""

    params: dict[str, gr.components.Component]
    loras: LoraStack
    open_in_gallery: gr.Button
    last_item: gr.State
    tab_id: str = "infer"


def build(ctx: StudioContext, api: StudioApi) -> InferHandles:
    def limits(name: str) -> dict[str, float]:
        low, high = LIMITS[name]
        return {"minimum": low, "maximum": high}

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
            with gr.Accordion("Parameters", open=True, elem_classes=["form-section"]):
                with gr.Row(elem_classes=["form-grid"]):
                    width = gr.Number(DEMO["width"], precision=0, step=16, label="width", elem_id="infer-width", **limits("width"), min_width=120)
                    height = gr.Number(DEMO["height"], precision=0, step=16, label="height", elem_id="infer-height", **limits("height"), min_width=120)
                    frames = gr.Number(DEMO["num_frames"], precision=0, step=4, label="frames (4k+1)", elem_id="infer-frames", **limits("num_frames"),
                                       min_width=120)
                    fps = gr.Number(DEMO["fps"], precision=0, label="fps", **limits("fps"), min_width=120)
                with gr.Row(elem_classes=["form-grid"]):
                    steps = gr.Slider(value=DEMO["steps"], step=1, label="steps", elem_id="infer-steps", **limits("steps"))
                    guidance = gr.Slider(value=DEMO["guidance_scale"], step=0.5, label="guidance scale", **limits("guidance_scale"))
                    shift = gr.Number(None, step=0.1, label="flow shift (0 or empty: the model's own)",
                                      minimum=0, maximum=LIMITS["flow_shift"][1], min_width=120)
                with gr.Row(elem_classes=["form-grid"]):
                    seed = gr.Number(-1, precision=0, label="seed (-1 = random)", elem_id="infer-seed", min_width=140)
                    count = gr.Number(1, precision=0, label="videos", **limits("num_videos"), min_width=120)
                    fuse = gr.Checkbox(False, label="fuse LoRAs (faster, fixed weights)", min_width=160)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="infer-generate", scale=3)
                cancel = gr.Button("Cancel", variant="stop", elem_id="infer-cancel", scale=1)
            request_msg = gr.HTML()
        with gr.Column(scale=4, elem_classes=["panel"]):
            gr.Markdown("### Result")
            progress = gr.HTML(progress_bar(None, "idle"), elem_id="infer-progress")
            video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, elem_id="infer-video")
            with gr.Row(equal_height=True):
                gallery_link = gr.HTML(elem_id="infer-gallery-link")
                open_in_gallery = gr.Button("Open in Gallery", size="sm", visible=False, scale=0, min_width=140,
                                            elem_id="infer-open-gallery")
            timings = gr.JSON(label="Timings", visible=False)
    request_id = gr.State(None)
    shown = gr.State(None)
    last_item = gr.State(None)
    timer = gr.Timer(ctx.settings.poll_interval_s)

    params = {"model": model, "prompt": prompt, "negative_prompt": negative, "width": width, "height": height,
              "num_frames": frames, "fps": fps, "steps": steps, "guidance_scale": guidance, "flow_shift": shift,
              "seed": seed, "num_videos": count, "fuse_loras": fuse}
    by_component = {component: name for name, component in params.items()}

    def refresh_loras(request: gr.Request):
        user = request_user(api, request)
        choices = api.lora_choices(user)
        return [gr.update(choices=choices) for _ in stack.refs]

    stack.add.click(refresh_loras, None, stack.refs, queue=False, api_visibility="private")

    def add_upload(file: str | None, count: int, *values: Any, request: gr.Request):
        user = request_user(api, request)
        if not file:
            return gr.skip()
        with user_errors():
            reference = api.upload_lora(user, file)
        loras = LoraStack.read(count, list(values)) + [{"lora": reference, "weight": 1.0}]
        choices = api.lora_choices(user)
        filled = LoraStack.fill(loras)
        n = len(stack.refs)
        refs = [gr.update(choices=choices, value=v) for v in filled[1:1 + n]]
        return [filled[0], *refs, *filled[1 + n:]]

    upload.upload(add_upload, [upload, stack.visible, *stack.refs, *stack.weights],
                  [stack.visible, *stack.refs, *stack.weights, *stack.rows], api_visibility="private")

    def submit(values: dict, request: gr.Request):
        user = request_user(api, request)
        lora_values = [values[c] for c in (*stack.refs, *stack.weights)]
        req = form_request({name: values[c] for c, name in by_component.items()})
        req["loras"] = LoraStack.read(values[stack.visible], lora_values)
        with user_errors():
            rid = api.generate(user, req)["request_id"]
        return rid, progress_bar(0.0, "queued"), "", message(f"request {rid} queued", "ok"), gr.update(visible=False)

    generate.click(submit, {*params.values(), stack.visible, *stack.refs, *stack.weights},
                   [request_id, progress, gallery_link, request_msg, open_in_gallery], api_visibility="private")

    def stop(rid: str | None, request: gr.Request):
        user = request_user(api, request)
        if not rid:
            return message("nothing to cancel", "info")
        with user_errors():
            status = api.cancel_generation(user, rid)
        return message(f"cancel requested ({status['state']})", "ok")

    cancel.click(stop, request_id, request_msg, api_visibility="private")

    def poll(rid: str | None, last_shown: str | None, request: gr.Request):
        user = request_user(api, request)
        unchanged = (gr.skip(),) * 4
        if not rid or rid == last_shown:
            return (*unchanged, last_shown, gr.skip(), gr.skip())
        try:
            status = api.generation_status(user, rid)
        except gr.Error:
            return progress_bar(None, "request not found"), gr.skip(), gr.skip(), gr.skip(), rid, gr.skip(), \
                gr.skip()
        state = status["state"]
        total = status.get("total_steps") or 0
        text = f"{state} · step {status.get('step', 0)}/{total}" if total else state
        if status.get("eta_s") and state == "running":
            text += f" · ETA {status['eta_s']:.0f}s"
        if state not in TERMINAL:
            fraction = status.get("step", 0) / total if total else None
            return progress_bar(fraction, text), gr.skip(), gr.skip(), gr.skip(), last_shown, gr.skip(), gr.skip()
        if state != "succeeded":
            return progress_bar(None, f"{state}: {status.get('error') or ''}"), gr.skip(), \
                message(status.get("error") or state, "error"), gr.skip(), rid, gr.skip(), gr.skip()
        item_id = status["gallery_ids"][0]
        item = api.own_item(user, item_id)
        link = f"<span class='gallery-link'>Gallery entry {item_id} (seed {item.seed})</span>"
        return progress_bar(1.0, f"done · seed {item.seed}"), str(item.video_path), link, \
            gr.update(value=status.get("timings"), visible=True), rid, item_id, gr.update(visible=True)

    timer.tick(poll, [request_id, shown],
               [progress, video, gallery_link, timings, shown, last_item, open_in_gallery], queue=False,
               show_progress="hidden", api_visibility="private")
    return InferHandles(params=params, loras=stack, open_in_gallery=open_in_gallery, last_item=last_item)
