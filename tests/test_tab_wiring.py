"""Every event handler of every tab, called the way Gradio calls it: the inputs Gradio passes (a dict for
dict inputs), with `gr.Request` / event data injected by Gradio's own `special_args`, must bind to the
handler's signature. (An Infer tab handler once took `request` after `*values`: Gradio could not pass
it and every LoRA upload failed.) The LoRA upload handler then runs for real."""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from gradio.helpers import special_args

from studio.api import StudioApi
from studio.shell import build_app


@pytest.fixture
def app(api: StudioApi) -> Iterator[gr.Blocks]:
    yield build_app(api.ctx)


def gradio_inputs(block_fn: Any, values: list[Any]) -> list[Any]:
    """The positional arguments Gradio hands `block_fn.fn` for these input values."""
    inputs = [dict(zip(block_fn.inputs, values, strict=True))] if block_fn.inputs_as_dict else list(values)
    event = gr.EventData(None, {"index": 0, "value": None, "selected": True})
    processed, *_ = special_args(block_fn.fn, inputs, gr.Request(username="alice"), event)
    return processed


def handlers(app: gr.Blocks) -> list[Any]:
    return [fn for fn in app.fns.values() if fn.fn is not None]


def test_every_handler_binds_to_what_gradio_passes(app: gr.Blocks) -> None:
    found = handlers(app)
    assert len(found) >= 40  # the four tabs and the HTTP API
    wrong = []
    for block_fn in found:
        args = gradio_inputs(block_fn, [None] * len(block_fn.inputs))
        try:
            inspect.signature(block_fn.fn).bind(*args)
        except TypeError as exc:
            wrong.append(f"{block_fn.name}: {exc}")
    assert wrong == []


def test_the_lora_upload_adds_the_file_to_the_stack(app: gr.Blocks, api: StudioApi, tmp_path: Path) -> None:
    from tests.trainer_support import save_lora_file

    lora = save_lora_file(tmp_path / "run", "epoch1", 10)
    (upload,) = [fn for fn in handlers(app) if fn.name == "add_upload"]
    # inputs: the file, the visible row count, then every row's LoRA ref and weight (empty form)
    rows = (len(upload.inputs) - 2) // 2
    values = [str(lora), 0, *[None] * rows, *[1.0] * rows]
    outputs = upload.fn(*gradio_inputs(upload, values))
    assert outputs[0] == 1  # one row visible now
    assert outputs[1]["value"].startswith("upload:") and outputs[1]["value"] in dict(
        (v, v) for _, v in outputs[1]["choices"])
    stored = api.ctx.layout.home / "uploads"
    assert list(stored.rglob("*.safetensors"))  # kept in the user's uploads


def test_reuse_fills_the_start_image_and_compare_sends_it(app: gr.Blocks, api: StudioApi, tmp_path: Path) -> None:
    """Gallery "Reuse in Infer" puts an image-to-video item's start image into the Infer form's image input
    (and clears it for a text-to-video item); Compare reads that input."""
    from tests.family_support import start_image
    from tests.gallery_support import add

    image = start_image(tmp_path / "start.png")
    (reuse,) = [fn for fn in handlers(app) if fn.name == "on_reuse"]
    image_output = [getattr(block, "elem_id", None) for block in reuse.outputs].index("infer-image")
    for item, expected in ((add(api.ctx.gallery, "i2v", image=str(image)), image.read_bytes()),
                           (add(api.ctx.gallery, "t2v"), None)):
        outputs = reuse.fn(*gradio_inputs(reuse, [item.id]))
        assert len(outputs) == len(reuse.outputs)
        filled = outputs[image_output]
        assert (Path(filled).read_bytes() if filled else None) == expected
    (start,) = [fn for fn in handlers(app) if fn.name == "on_start" and any(
        getattr(block, "elem_id", None) == "compare-loras" for block in fn.inputs)]
    assert "infer-image" in [getattr(block, "elem_id", None) for block in start.inputs]


def owning_tab(block: Any) -> gr.Tab | None:
    while block is not None and not isinstance(block, gr.Tab):
        block = block.parent
    return block


def test_only_the_shown_tabs_timers_tick(app: gr.Blocks) -> None:
    """Each tick is a request Gradio answers by walking the page; hidden tabs' timers must stay still.
    Selecting a tab, by a click or by an event (Reuse in Infer, Open in Gallery), starts its timers
    and stops every other tab's."""
    timers = [b for b in app.blocks.values() if isinstance(b, gr.Timer)]
    tab_of = {t._id: owning_tab(t) for t in timers}
    tabs = {tab._id: tab for tab in tab_of.values() if tab is not None}
    assert len(tabs) == 4 and None not in tab_of.values()  # every tab has a timer, every timer a tab
    first = next(b for b in app.blocks.values() if isinstance(b, gr.Tab))
    assert {t._id for t in timers if t.active} == {t._id for t in timers if tab_of[t._id] is first}

    shows = [fn for fn in handlers(app) if fn.name == "show_tab_timers"]
    assert len(shows) == 6  # a click on each of the four tabs, and the two events that switch tabs
    selected_by_click = set()
    for fn in shows:
        assert [o._id for o in fn.outputs] == [t._id for t in timers]  # every timer, each time
        active = {t._id for t, state in zip(timers, fn.fn(), strict=True) if state.active}
        (shown,) = {tab_of[i]._id for i in active}  # one tab's timers, and all of them
        assert active == {t._id for t in timers if tab_of[t._id]._id == shown}
        clicked = [block_id for block_id, event in fn.targets if event == "select" and block_id in tabs]
        if clicked:
            assert clicked == [shown]
            selected_by_click.add(shown)
    assert selected_by_click == set(tabs)
