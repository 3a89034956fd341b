"""The pre-flight planner (engine.planner): shapes from config files, estimates against recorded
measurements, the cheapest change that fits, and its three doors (Train tab, HTTP API, CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import TrainConfig
from engine.failures import classify_failure
from engine.families.wan_random import transformer_config
from engine.planner import DeviceSet, Workload, estimate, suggest
from engine.planner_shapes import Clip, ModelShape

CLIP_81 = Clip(832, 480, 81)
FAST = {"activation_checkpointing": True, "performance.checkpointing": "save_attention",
        "performance.lora_compute_dtype": "activation", "performance.compile_blocks": True,
        "performance.attention_backend": "flash3"}


def shape_of(preset: str) -> ModelShape:
    return ModelShape.from_transformer_config(transformer_config(preset))


def config(**changes) -> TrainConfig:
    cfg = TrainConfig(output_dir="o")
    for path, value in changes.items():
        cfg = cfg.with_value(path.replace("__", "."), value)
    return cfg


def work(clip: Clip = CLIP_81) -> Workload:
    return Workload(clip, {clip: 1}, {}, None, "config")


@pytest.mark.parametrize("preset", ["tiny", "1.3B", "14B"])
def test_parameter_count_matches_the_diffusers_model(preset: str) -> None:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**transformer_config(preset))
    shape = shape_of(preset)
    assert shape.params == sum(p.numel() for p in model.parameters())
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith("blocks."))
    assert shape.block_linear_params * shape.layers == linears


def test_lora_parameter_count_matches_peft() -> None:
    from peft import LoraConfig

    from engine.config import DEFAULT_LORA_TARGETS
    from engine.families.wan import WanFamily
    from engine.families.wan_random import random_transformer

    model = random_transformer("tiny")
    targets = WanFamily().lora_target_modules(model, list(DEFAULT_LORA_TARGETS))
    model.add_adapter(LoraConfig(r=4, target_modules=targets))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert shape_of("tiny").lora_params(4, list(DEFAULT_LORA_TARGETS)) == lora


def test_tokens_and_the_demo_model_folder_are_read_without_weights() -> None:
    assert shape_of("1.3B").tokens(CLIP_81) == 32_760  # 21 x 60 x 104 / 4 (REFERENCE)
    demo = ModelShape.from_model_dir(Path(__file__).resolve().parent.parent / "assets" / "demo_model")
    assert (demo.width, demo.layers, demo.vae_spatial) == (128, 6, 4) and demo.text_encoder_params > 0


@pytest.mark.parametrize("preset, card, step, peak", [
    ("14B", "H100", 9.203, 63.17),  # bench/RESULTS.md third session, trainer + flash3 + B (not fitted on)
    ("1.3B", "H100", 1.833, 13.88),  # the same, 1.3B (fitted on)
])
def test_estimates_stay_within_the_issue_bounds_of_recorded_runs(preset: str, card: str, step: float,
                                                                 peak: float) -> None:
    result = estimate(config(**FAST), shape_of(preset), DeviceSet.gpus(card), work())
    assert abs(result.s_per_step / step - 1) < 0.20
    assert abs(result.gpu_peak_gib / peak - 1) < 0.10


def test_each_memory_option_moves_the_estimate_the_right_way() -> None:
    shape, gpu = shape_of("14B"), DeviceSet.gpus("H100")
    base = estimate(config(activation_checkpointing=True), shape, gpu, work())
    fp8 = estimate(config(activation_checkpointing=True, model__transformer_dtype="float8"), shape, gpu, work())
    swap = estimate(config(activation_checkpointing=True, blocks_to_swap=20), shape, gpu, work())
    fewer = estimate(config(activation_checkpointing=True), shape, gpu, work(Clip(832, 480, 33)))
    assert fp8.gpu_parts["base weights"] < 0.6 * base.gpu_parts["base weights"]
    assert swap.gpu_peak_gib < base.gpu_peak_gib and swap.host_ram_gib > base.host_ram_gib
    assert fewer.gpu_peak_gib < base.gpu_peak_gib and fewer.s_per_step < base.s_per_step / 2
    unswapped = estimate(config(blocks_to_swap=20), shape, gpu, work())  # no checkpointing: nothing saved
    assert unswapped.gpu_parts["base weights"] == estimate(config(), shape, gpu, work()).gpu_parts["base weights"]


def test_the_cheapest_fitting_change_is_lossless_when_one_exists() -> None:
    card = DeviceSet.gpus("RTX 4090", 24)
    # 1.3B at 480p81 without checkpointing: turning it on (keeping attention) is enough
    found = suggest(config(), shape_of("1.3B"), card, work())
    assert found.lossless and found.changes == {"activation_checkpointing": True,
                                                "performance.checkpointing": "save_attention"}
    # 14B at 33 frames: the weights alone exceed the card; the fewest swapped blocks that fit
    cfg, shape, clip = config(activation_checkpointing=True), shape_of("14B"), work(Clip(832, 480, 33))
    found = suggest(cfg, shape, card, clip)
    n = found.changes["blocks_to_swap"]
    assert found.lossless and found.estimate.fits and 0 < n < shape.layers
    assert not estimate(cfg.with_value("blocks_to_swap", n - 1), shape, card, clip).fits
    # 14B at 81 frames: the kept block inputs alone are ~13 GiB; only offloading them (and swapping) fits 24 GB
    found = suggest(cfg, shape, card, work())
    assert found.lossless and found.estimate.fits and found.changes["performance.checkpointing"] == "offload"
    assert not estimate(cfg.with_value("blocks_to_swap", shape.layers), shape, card, work()).fits
    # 1.3B at 81 frames on 8 GB: nothing lossless fits; fp8 comes before fewer frames
    found = suggest(cfg, shape_of("1.3B"), DeviceSet.gpus("RTX 4060", 8), work())
    assert not found.lossless and found.estimate.fits and found.changes["model.transformer_dtype"] == "float8"
    assert "dataset.frame_buckets" not in found.changes
    # at 6 GB not even that: the most frames that fit
    found = suggest(cfg, shape_of("1.3B"), DeviceSet.gpus("RTX 4060", 6), work())
    assert not found.lossless and found.estimate.fits and found.changes["dataset.frame_buckets"][-1] < 81


def test_a_text_encoder_larger_than_the_card_is_named() -> None:
    """Training may fit an 8 GB card while encoding the cache cannot: UMT5-XXL is ~5.7B parameters."""
    from dataclasses import replace

    shape = replace(shape_of("1.3B"), text_encoder_params=5_680_000_000)
    small = estimate(config(), shape, DeviceSet.gpus("RTX 4060", 8), work(Clip(832, 480, 17)))
    assert any(note.startswith("caching: the text encoder alone needs ~10.6 GiB") for note in small.notes)
    assert not any("caching" in note for note in estimate(config(), shape, DeviceSet.gpus("RTX 4090"), work()).notes)


def test_cpu_times_come_with_the_band_measured_runs_fell_in() -> None:
    result = estimate(config(), shape_of("tiny"), DeviceSet.cpu(1, memory_gib=8), work(Clip(64, 64, 17)))
    low, high = result.time_band
    assert low < 1 < high and any(f"{result.s_per_step * high:.2f} s/step" in note for note in result.notes)
    assert estimate(config(), shape_of("tiny"), DeviceSet.gpus("H100"), work()).time_band is None


def test_activation_offload_trades_gpu_memory_for_host_memory_and_copy_time() -> None:
    shape, gpu = shape_of("14B"), DeviceSet.gpus("H100")
    full = estimate(config(activation_checkpointing=True), shape, gpu, work())
    offload = estimate(config(activation_checkpointing=True, performance__checkpointing="offload"), shape, gpu, work())
    kept = shape.layers * shape.tokens(CLIP_81) * shape.width * 2 / 2**30  # every block's input, bf16
    saved = full.gpu_parts["activations"] - offload.gpu_parts["activations"]
    assert 0.9 * kept < saved < kept
    # pinned buffers come in powers of two; the copies also carry the text states and RoPE tables
    assert kept < offload.host_parts["pinned offloaded activations"] < 2 * kept
    copy_s = 2 * kept * 2**30 / (gpu.rates.h2d_gb_s * 1e9)  # there and back
    assert copy_s < offload.s_per_step - full.s_per_step < 1.2 * copy_s
    assert any("activation offload" in note for note in offload.notes)


def _config_only_model(folder: Path, preset: str) -> Path:
    """A Wan folder with config files and no weights: all the planner reads."""
    for sub, data in {"": {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]},
                      "transformer": {**transformer_config(preset), "patch_size": [1, 2, 2]},
                      "vae": {"z_dim": 16, "scale_factor_spatial": 8, "scale_factor_temporal": 4}}.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        name = "model_index.json" if not sub else "config.json"
        (folder / sub / name).write_text(json.dumps(data))
    return folder


def test_cli_plan_exits_3_with_the_change_that_fits(tmp_path: Path, capsys) -> None:
    from studio.cli import main

    model = _config_only_model(tmp_path / "wan14b", "14B")
    toml = tmp_path / "plan.toml"
    toml.write_text(f'output_dir = "o"\nactivation_checkpointing = true\n[model]\nckpt_path = "{model}"\n'
                    '[dataset]\nresolutions = [480]\nframe_buckets = [33]\n[[dataset.directory]]\npath = "nowhere"\n')
    assert main(["--home", str(tmp_path / "home"), "train", str(toml), "--plan", "--card", "RTX 4090"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("does not fit: GPU peak") and "to fit: blocks_to_swap = " in out
    assert main(["--home", str(tmp_path / "home"), "train", str(toml), "--plan", "--card", "H100"]) == 0
    assert capsys.readouterr().out.startswith("fits: GPU peak")


def test_train_tab_and_api_plan_the_form_config(api, tmp_path: Path) -> None:
    from studio.auth import User
    from studio.presets import DEMO_PRESET
    from tabs import train
    from tests.ui_support import write_dataset

    alice = User("alice")
    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(write_dataset(api.ctx.layout.home))
    note = train.plan_note(api, alice, cfg, [], 1)  # no GPU here: a CPU slot, memory = host RAM
    assert "fits: host RAM peak" in note and "s/step" in note and "cache" in note
    plan = api.plan_training(alice, cfg.to_toml(), card="RTX 4090:24")
    assert plan["device"] == "RTX 4090 (24 GiB)" and plan["fits"] and plan["estimate"]["steps"] > 0
    with pytest.raises(ValueError, match="gpus"):
        api.plan_training(alice, cfg.to_toml(), gpus="7")


def test_an_oom_failure_names_the_planners_change() -> None:
    message = ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
               "planner suggests: blocks_to_swap = 12: ~21.0 GiB, ~30.10 s/step (+4%)")
    reason, hint = classify_failure(1, "", message)
    assert reason == "CUDA out of memory" and "blocks_to_swap = 12" in hint
    assert "blocks_to_swap" not in classify_failure(1, "", "OutOfMemoryError: CUDA out of memory.")[1]


def test_the_trainer_names_the_change_after_a_cuda_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """advice_after_oom plans for the card the trainer ran on; when the plan said "fits", for 85% of it."""
    from types import SimpleNamespace

    from engine.planner import OOM_ADVICE_PREFIX, advice_after_oom

    model = _config_only_model(tmp_path / "wan14b", "14B")
    cfg = config(activation_checkpointing=True, model__ckpt_path=str(model), dataset__frame_buckets=[33])
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    card = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    advice = advice_after_oom(cfg, oom, 1)
    assert advice.startswith("\n" + OOM_ADVICE_PREFIX + "blocks_to_swap = ")
    assert advice_after_oom(cfg, ValueError("bad value"), 1) == ""
    card.name, card.total_memory = "NVIDIA H100 80GB HBM3", 80 * 2**30  # the plan fits: ask for less
    assert OOM_ADVICE_PREFIX in advice_after_oom(cfg, oom, 1)
