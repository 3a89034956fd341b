"""InferRequest validation and LoRA references: clear errors naming the field, before any model work."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.inference.request import LIMITS, InferRequest, LoraSpec, request_defaults, resolve_lora_path


def valid(**changes) -> InferRequest:
    values = dict(model="demo", prompt="a star", width=832, height=480, num_frames=81, steps=30, seed=1)
    values.update(changes)
    return InferRequest(**values)


def test_defaults_with_a_prompt_are_valid() -> None:
    req = InferRequest(prompt="x").validate()
    assert req.seed is None and req.flow_shift is None  # filled in at submit, then recorded


@pytest.mark.parametrize("changes, field, hint", [
    ({"width": 500}, "width", "multiple of 16"),
    ({"height": 0}, "height", "[16, 2048]"),
    ({"num_frames": 80}, "num_frames", "4k+1"),
    ({"steps": 0}, "steps", "[1, 200]"),
    ({"steps": 2.5}, "steps", "whole number"),
    ({"guidance_scale": -1.0}, "guidance_scale", "[0, 30]"),
    ({"flow_shift": float("nan")}, "flow_shift", "number"),
    ({"fps": 0}, "fps", "[1, 60]"),
    ({"num_videos": 17}, "num_videos", "[1, 16]"),
    ({"seed": -3}, "seed", "[0,"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"model": ""}, "model", "model"),
    ({"loras": [{"path": "a.safetensors", "weight": 9.0}]}, "loras[0].weight", "[-4, 4]"),
    ({"seed": "abc"}, "seed", "whole number"),
    ({"fuse_loras": "yes"}, "fuse_loras", "true or false"),
    ({"loras": [LoraSpec("a.safetensors"), LoraSpec("a.safetensors")]}, "loras[1].path", "twice"),
])
def test_out_of_range_fields_are_named(changes, field, hint) -> None:
    with pytest.raises(ConfigError) as err:
        valid(**changes).validate()
    assert err.value.paths == [field]
    assert hint in str(err.value)


def test_all_bad_fields_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        valid(width=17, height=33, num_frames=2).validate()
    assert err.value.paths == ["width", "height", "num_frames"]


def test_with_seed_draws_once_and_keeps_given_seed() -> None:
    drawn = valid(seed=None).with_seed()
    assert isinstance(drawn.seed, int) and drawn.with_seed().seed == drawn.seed
    assert valid(seed=7).with_seed().seed == 7


def test_round_trip_through_dict_and_unknown_fields_rejected() -> None:
    req = valid(loras=[LoraSpec("a.safetensors", 0.5)], fuse_loras=True)
    assert InferRequest.from_dict(req.to_dict()) == req
    with pytest.raises(ConfigError, match="colour"):
        InferRequest.from_dict({**req.to_dict(), "colour": "red"})


def test_whole_floats_from_widgets_become_ints() -> None:
    req = InferRequest.from_dict({"prompt": "x", "width": 512.0, "seed": 42.0, "steps": 20.0})
    assert (req.width, req.seed, req.steps) == (512, 42, 20) and isinstance(req.seed, int)
    with pytest.raises(ConfigError, match="steps"):
        InferRequest.from_dict({"prompt": "x", "steps": 20.5}).validate()


def test_lora_spec_parses_cli_form() -> None:
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec("style.safetensors", 0.8)
    assert LoraSpec.parse("runs/7/epoch2") == LoraSpec("runs/7/epoch2", 1.0)
    assert LoraSpec.parse("C:/x/style.safetensors") == LoraSpec("C:/x/style.safetensors", 1.0)


def test_lora_references_resolve_to_files(tmp_path: Path) -> None:
    from tests.trainer_support import save_lora_file as save

    run = tmp_path / "run"
    for name, step in (("epoch2", 200), ("epoch10", 1000), ("step500", 500)):
        save(run, name, step)
    (run / "global_step9").mkdir()
    single = tmp_path / "style.safetensors"
    single.write_bytes(b"x")
    assert resolve_lora_path(single) == single.resolve()
    assert resolve_lora_path(run / "epoch2") == (run / "epoch2" / "adapter_model.safetensors").resolve()
    # A run directory: its newest save by the step it was saved at (epoch10 at step 1000).
    assert resolve_lora_path(run) == (run / "epoch10" / "adapter_model.safetensors").resolve()
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_lora_path(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        resolve_lora_path(run / "global_step9")


def test_ui_api_and_cli_share_one_set_of_defaults() -> None:
    """The same prompt and seed from the form, the HTTP API or the CLI make the same request (they once
    differed: flow shift 3.0 in the UI/API, the model's own 2.0 from the CLI)."""
    from studio.cli import build_parser
    from studio.cli.infer import build_request
    from tabs.infer import DEMO

    demo = InferRequest.from_dict({"model": "demo", "prompt": "p", "seed": 1})
    assert (demo.width, demo.height, demo.num_frames, demo.steps) == (64, 64, 17, 20)
    assert demo.flow_shift is None  # the model's own, filled in by the service at submit
    # The API hands left-out fields over as None.
    assert InferRequest.from_dict({"model": "demo", "prompt": "p", "seed": 1, "width": None,
                                   "flow_shift": None, "steps": None}) == demo
    wan = InferRequest.from_dict({"model": "/models/wan", "prompt": "p", "width": None})
    assert (wan.width, wan.height, wan.num_frames, wan.steps) == (832, 480, 81, 30)
    assert request_defaults("demo") == DEMO  # the Infer form starts on these
    assert build_request(build_parser().parse_args(["infer", "--prompt", "p", "--seed", "1"])) == demo


def test_the_forms_lora_weight_slider_has_the_servers_limits() -> None:
    import gradio as gr

    from studio.widgets import LoraStack

    with gr.Blocks():
        stack = LoraStack.build()
    assert {(w.minimum, w.maximum) for w in stack.weights} == {LIMITS["lora_weight"]}
