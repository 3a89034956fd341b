"""Wan2.2 A14B's two experts in one run (tiny random two-expert Wan, real trainer and worker on CPU):
each step trains the expert of its noise level, one save holds a LoRA per expert, samples use both,
and inference loads each file into its expert."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, TrainConfig
from engine.trainer.experts import HIGH_NOISE, LOW_NOISE, ExpertSchedule
from engine.trainer.objective import sample_timesteps
from tests.family_support import generate_family, train_family
from tests.trainer_support import of_kind


@pytest.fixture(scope="module")
def two_expert_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.families.wan_random import build_random_wan

    return build_random_wan(tmp_path_factory.mktemp("model") / "tiny_wan22", preset="tiny", seed=0,
                            boundary_ratio=0.875)


def _cfg(**model: object) -> TrainConfig:
    return TrainConfig.from_dict({"output_dir": "out", "model": {"timestep_sample_method": "logit_normal",
                                                                 "shift": 3.0, **model}})


@pytest.mark.parametrize("method", ["logit_normal", "uniform"])
def test_each_expert_draws_its_side_of_the_boundary_with_the_models_distribution(method: str) -> None:
    cfg = _cfg(timestep_sample_method=method, boundary_ratio=0.6)
    schedule = ExpertSchedule.from_config(cfg, 0.6)
    plain = sample_timesteps(cfg, 200_000, torch.Generator().manual_seed(0))
    assert abs(schedule.p_high - (plain >= 0.6).float().mean().item()) < 0.005
    for expert, (lo, hi) in ((HIGH_NOISE, (0.6, 1.0)), (LOW_NOISE, (0.0, 0.6))):
        t = schedule.clamp(sample_timesteps(cfg, 50_000, torch.Generator().manual_seed(1), schedule.t_range(expert)),
                           expert)
        assert lo <= t.min() and (t.max() < hi if expert == LOW_NOISE else t.max() <= hi)
        side = plain[(plain >= lo) & (plain < hi)]  # the same distribution restricted to this side
        assert abs(t.mean().item() - side.mean().item()) < 0.005
    steps = [schedule.expert_for_step(s) for s in range(4000)]
    assert abs(steps.count(HIGH_NOISE) / 4000 - schedule.p_high) < 0.03
    assert steps == [schedule.expert_for_step(s) for s in range(4000)]  # a resume replays the same experts


def test_two_expert_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(experts="both", boundary_ratio=1.0, transformer_path="x.safetensors").model_copy(
            update={"zero_stage": 2}).validate()
    paths = {path for path, _ in err.value.errors}
    assert {"model.boundary_ratio", "model.transformer_path", "zero_stage"} <= paths


def test_one_run_trains_both_experts_samples_with_both_and_the_worker_loads_each(
        tmp_path: Path, two_expert_model: Path) -> None:
    # boundary 0.5 with uniform t: both experts get steps early on (seed 7 draws both within 4 steps)
    run = train_family(tmp_path, two_expert_model, **{
        "save_every_n_epochs": 2, "model.experts": "both", "model.boundary_ratio": 0.5, "micro_batch_size_per_gpu": 1,
        "sample.prompts": ["a green square"], "sample.steps": 2, "sample.width": 32, "sample.num_frames": 1,
        "sample.guidance_scale": 1.0})
    save = run.save
    assert sorted(p.name for p in save.glob("*.safetensors")) == ["high_noise_model.safetensors",
                                                                  "low_noise_model.safetensors"]
    from engine.lora import inspect_lora

    for expert in (HIGH_NOISE, LOW_NOISE):
        info = inspect_lora(save / f"{expert}_model.safetensors")
        assert info.family == "wan" and info.key_format == "comfy" and info.metadata["expert"] == expert
    assert of_kind(run.events, "sample") and (run.run_dir / "samples" / save.name / "0.mp4").is_file()
    from engine.rundir import RunDir

    assert RunDir(run.run_dir).newest_lora().file.name == "high_noise_model.safetensors"
    _cache_puts_each_expert_lora_in_its_expert(two_expert_model, save)
    generate_family(tmp_path, two_expert_model, save)


def _cache_puts_each_expert_lora_in_its_expert(model: Path, save: Path) -> None:
    """In-process, the worker's pipeline cache puts each file of the pair in its expert."""
    from engine.inference.pipeline import PipelineCache
    from engine.inference.request import resolve_lora_path
    from engine.lora import load_lora_state_dict

    cache = PipelineCache("cpu")
    loaded, _ = cache.get(model)
    assert loaded.pipe.transformer_2 is not None and loaded.pipe.config.boundary_ratio == 0.875
    cache.apply_loras(loaded, [(str(resolve_lora_path(save)), 1.0)])
    for transformer, expert in ((loaded.pipe.transformer, HIGH_NOISE), (loaded.pipe.transformer_2, LOW_NOISE)):
        saved = load_lora_state_dict(save / f"{expert}_model.safetensors")
        want = saved["diffusion_model.blocks.0.self_attn.q.lora_B.weight"]
        got = dict(transformer.named_parameters())
        got = next(v for k, v in got.items() if k.startswith("blocks.0.attn1.to_q.lora_B"))
        assert torch.allclose(got.float(), want.float(), atol=1e-2), expert


@pytest.mark.slow  # about 15 s on a quiet 2-core machine
def test_ti2v_5b_shape_trains_and_generates_with_its_48_channel_vae(tmp_path: Path) -> None:
    """Wan2.2 TI2V-5B (text-to-video): 48 latent channels, 32 px per token; trainer, then the worker."""
    from engine.families.wan_random import build_random_wan

    model = build_random_wan(tmp_path / "tiny_ti2v", preset="tiny", vae="wan2.2")
    run = train_family(tmp_path, model, **{"dataset.resolutions": [64], "sample.prompts": ["a green square"],
                                           "sample.steps": 2, "sample.num_frames": 5, "sample.guidance_scale": 1.0})
    assert (run.run_dir / "samples" / run.save.name / "0.mp4").is_file()
    generate_family(tmp_path, model, run.save, size=64, frames=5)


def test_a_step_of_one_expert_leaves_the_other_without_gradient_or_update() -> None:
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from engine.families.wan import WanFamily
    from engine.families.wan_random import transformer_config
    from engine.trainer.experts import ExpertPairModule

    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**transformer_config("tiny")).requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, target_modules=["to_q"], init_lora_weights=False))
        experts.append(model)
    pair = ExpertPairModule(*experts, WanFamily(), torch.float32, boundary=0.5)
    lora = [p for p in pair.parameters() if p.requires_grad]
    for p in lora:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora, lr=0.1)
    latents, noise = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4)
    text = torch.randn(2, 8, 32)
    for t in (torch.tensor([0.2, 0.3]), torch.tensor([0.7, 0.9])):  # a low-noise step, then a high-noise one
        before = {n: p.detach().clone() for n, p in pair.named_parameters() if p.requires_grad}
        pair(latents, text, noise, t).backward()
        for p in lora:  # what DeepSpeed's all-reduce does to a parameter without a gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        pair.drop_idle_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ran = "low_noise" if t[0] < 0.5 else "high_noise"
        for name, p in pair.named_parameters():
            if p.requires_grad:
                moved = not torch.equal(before[name], p)
                assert moved == (f"experts.{ran}." in name), name  # Adam's momentum never moves the idle one


def test_the_train_tab_offers_both_expert_files_of_a_save(api) -> None:
    """A two-expert save downloads as its two files, each named by run, save and expert (ComfyUI loads one
    per expert); a one-model save stays one file."""
    from safetensors.torch import save_file

    from studio.auth import User
    from studio.presets import DEMO_PRESET
    from tabs import runs, train
    from tests.ui_support import write_dataset

    alice = User("alice")
    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(write_dataset(api.ctx.layout.home))
    job = train.start_run(api, alice, cfg, [], 1, "a14b")
    run_dir = Path(api.ctx.scheduler.get(job["id"]).run_dir)
    for folder, names in (("epoch1", ["adapter_model"]), ("epoch2", ["high_noise_model", "low_noise_model"])):
        (run_dir / folder).mkdir(parents=True)
        for i, name in enumerate(names):
            save_file({"x": torch.full((1,), float(i))}, str(run_dir / folder / f"{name}.safetensors"),
                      metadata={"step": folder[-1], "epoch": folder[-1]})
    panel = runs.job_panel(api, alice, job["id"], last_files="")
    names = [Path(str(link)).name for link in panel.files]
    assert [n.split("-", 2)[-1] for n in names] == ["epoch2-high_noise_model.safetensors",
                                                    "epoch2-low_noise_model.safetensors", "epoch1.safetensors"]
    low = api.lora_downloads(alice, job["id"], "epoch2")[1]
    assert low.read_bytes() == (run_dir / "epoch2" / "low_noise_model.safetensors").read_bytes()


def test_worker_speed_options_apply_to_both_experts(two_expert_model: Path) -> None:
    from engine.inference.pipeline import PipelineCache
    from engine.inference.speed import InferenceSpeed

    cache = PipelineCache("cpu", speed=InferenceSpeed(step_cache=0.1))
    loaded, _ = cache.get(two_expert_model)
    assert loaded.pipe.transformer.is_cache_enabled and loaded.pipe.transformer_2.is_cache_enabled
