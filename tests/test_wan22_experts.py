"""Wan2.2 A14B's two experts in one run (tiny random two-expert Wan, real trainer and worker on CPU):
each step trains the expert of its noise level, one save holds a LoRA per expert, samples use both,
and inference loads each file into its expert."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, TrainConfig
from engine.trainer.experts import HIGH_NOISE, LOW_NOISE, ExpertSchedule
from engine.trainer.objective import sample_timesteps
from tests.trainer_support import (REPO_ROOT, make_dataset, of_kind, read_events, run_trainer, trainer_cmd,
                                   write_config)


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
    data = make_dataset(tmp_path / "data", images=2, video=False, corrupt_video=False, uncaptioned=False)
    # boundary 0.5 with uniform t: both experts get steps early on (seed 7 draws both within 4 steps)
    config = write_config(tmp_path, two_expert_model, data, epochs=2, save_every_n_epochs=2,
                          **{"model.experts": "both", "model.boundary_ratio": 0.5,
                             "dataset.frame_buckets": [1], "micro_batch_size_per_gpu": 1,
                             "sample.prompts": ["a green square"], "sample.steps": 2, "sample.width": 32,
                             "sample.num_frames": 1, "sample.guidance_scale": 1.0})
    run_dir = tmp_path / "run"
    result = run_trainer(trainer_cmd(config, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run_dir)
    assert events[-1]["event"] == "done" and not of_kind(events, "warning"), of_kind(events, "warning")
    save = Path(of_kind(events, "save")[-1]["path"])
    assert sorted(p.name for p in save.glob("*.safetensors")) == ["high_noise_model.safetensors",
                                                                  "low_noise_model.safetensors"]
    from engine.lora import inspect_lora, load_lora_state_dict

    for expert in (HIGH_NOISE, LOW_NOISE):
        file = save / f"{expert}_model.safetensors"
        info = inspect_lora(file)
        assert info.family == "wan" and info.key_format == "comfy" and info.metadata["expert"] == expert
        b = [v for k, v in load_lora_state_dict(file).items() if k.endswith("lora_B.weight")]
        assert any(v.abs().max() > 0 for v in b), f"the {expert} LoRA never trained"  # B starts at zero
    assert of_kind(events, "sample") and (run_dir / "samples" / save.name / "0.mp4").is_file()
    from engine.rundir import RunDir

    assert RunDir(run_dir).newest_lora().file.name == "high_noise_model.safetensors"

    _worker_loads_each_expert_lora(tmp_path, two_expert_model, save)


def _worker_loads_each_expert_lora(tmp_path: Path, model: Path, save: Path) -> None:
    """The worker process generates with the save; in-process, the same cache puts each file in its expert."""
    from engine.inference.pipeline import PipelineCache
    from engine.inference.request import resolve_lora_path
    from engine.lora import load_lora_state_dict

    high_file = resolve_lora_path(save)
    cache = PipelineCache("cpu")
    loaded, _ = cache.get(model)
    assert loaded.pipe.transformer_2 is not None and loaded.pipe.config.boundary_ratio == 0.875
    cache.apply_loras(loaded, [(str(high_file), 1.0)])
    for transformer, expert in ((loaded.pipe.transformer, HIGH_NOISE), (loaded.pipe.transformer_2, LOW_NOISE)):
        saved = load_lora_state_dict(save / f"{expert}_model.safetensors")
        want = saved["diffusion_model.blocks.0.self_attn.q.lora_B.weight"]
        got = dict(transformer.named_parameters())
        got = next(v for k, v in got.items() if k.startswith("blocks.0.attn1.to_q.lora_B"))
        assert torch.allclose(got.float(), want.float(), atol=1e-2), expert

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    request = {"prompt": "a green square", "negative_prompt": "", "loras": [{"weight": 1.0}], "guidance_scale": 1.0,
               "steps": 2, "num_videos": 1, "seed": 1, "width": 32, "height": 32, "num_frames": 1, "fps": 8,
               "flow_shift": 3.0}
    commands = [json.dumps({"op": "generate", "id": "r1", "request": request, "model_path": str(model),
                            "lora_files": [str(high_file)], "out_dir": str(tmp_path / "gen")}),
                 json.dumps({"op": "shutdown"})]
    proc = subprocess.run([sys.executable, "-m", "engine.inference.worker", "--device", "cpu"], cwd=REPO_ROOT,
                          env=env, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=240)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events if e.get("id") == "r1"][-1] == "done", proc.stderr[-3000:]
    assert (tmp_path / "gen/0").is_dir() and any((tmp_path / "gen/0").iterdir())


@pytest.mark.slow  # about 35 s on 2 cores
def test_ti2v_5b_shape_trains_and_generates_with_its_48_channel_vae(tmp_path: Path) -> None:
    """Wan2.2 TI2V-5B (text-to-video): 48 latent channels, 32 px per token; trainer, then the worker."""
    from engine.families.wan_random import build_random_wan
    from engine.lora import load_lora_state_dict

    model = build_random_wan(tmp_path / "tiny_ti2v", preset="tiny", vae="wan2.2")
    data = make_dataset(tmp_path / "data", images=2, video=False, corrupt_video=False, uncaptioned=False)
    config = write_config(tmp_path, model, data, epochs=2, **{"dataset.resolutions": [64], "dataset.frame_buckets": [1],
                                                              "sample.prompts": ["a green square"], "sample.steps": 2,
                                                              "sample.num_frames": 5, "sample.guidance_scale": 1.0})
    run_dir = tmp_path / "run"
    result = run_trainer(trainer_cmd(config, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run_dir)
    assert events[-1]["event"] == "done" and not of_kind(events, "warning"), of_kind(events, "warning")
    save = Path(of_kind(events, "save")[-1]["path"])
    assert any(v.abs().max() > 0 for k, v in load_lora_state_dict(save).items() if k.endswith("lora_B.weight"))
    assert (run_dir / "samples" / save.name / "0.mp4").is_file()

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    request = {"prompt": "a green square", "negative_prompt": "", "loras": [{"weight": 1.0}], "guidance_scale": 1.0,
               "steps": 2, "num_videos": 1, "seed": 1, "width": 64, "height": 64, "num_frames": 5, "fps": 8,
               "flow_shift": 3.0}
    commands = [json.dumps({"op": "generate", "id": "r1", "request": request, "model_path": str(model),
                            "lora_files": [str(save / "adapter_model.safetensors")], "out_dir": str(tmp_path / "gen")}),
                json.dumps({"op": "shutdown"})]
    proc = subprocess.run([sys.executable, "-m", "engine.inference.worker", "--device", "cpu"], cwd=REPO_ROOT,
                          env=env, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=240)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events if e.get("id") == "r1"][-1] == "done", proc.stderr[-3000:]


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
