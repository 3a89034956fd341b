"""Image-to-video for each Wan family on tiny random-weight models built by our own code: Wan2.1 I2V
(first-frame latents + mask channels, CLIP image tokens in cross-attention), Wan2.2 I2V A14B (both
experts, no image encoder) and Wan2.2 TI2V-5B's image mode (a clean first latent frame at t = 0).
Each trains with the real trainer (with samples) and generates from a start image with the real worker;
Wan2.1 I2V does both through the studio (a studio job, then `studio infer --image`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ConfigError
from engine.families.wan import WanFamily
from tests.family_support import generate_family, start_image, train_family


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from engine.families.wan_random import build_random_wan

    root = tmp_path_factory.mktemp("i2v_models")
    return {"wan21_i2v": build_random_wan(root / "wan21_i2v", i2v="wan2.1"),
            "wan22_i2v": build_random_wan(root / "wan22_i2v", i2v="wan2.2", boundary_ratio=0.9),
            "ti2v": build_random_wan(root / "ti2v", vae="wan2.2"),
            "t2v": build_random_wan(root / "t2v")}


def test_each_family_names_its_image_conditioning(models: dict[str, Path]) -> None:
    family = WanFamily()
    info = {name: family.describe(path) for name, path in models.items()}
    assert (info["wan21_i2v"].image_mode, info["wan21_i2v"].image_encoder) == ("concat", True)
    assert (info["wan22_i2v"].image_mode, info["wan22_i2v"].image_encoder) == ("concat", False)
    assert info["wan22_i2v"].two_experts and info["ti2v"].image_mode == "first_frame"
    assert family.image_mode(models["ti2v"], None) == "none" and family.image_mode(models["ti2v"], True) == "first_frame"
    assert family.image_mode(models["wan21_i2v"], None) == "concat"
    for model, wanted in ((models["wan21_i2v"], False), (models["t2v"], True)):
        with pytest.raises(ConfigError, match="model.image_to_video"):
            family.image_mode(model, wanted)


def test_inputs_are_built_as_diffusers_image_to_video_pipeline_builds_them(models: dict[str, Path]) -> None:
    """The training forward's transformer input equals WanImageToVideoPipeline's: same channels, same
    first-frame latents, same mask; and the CLIP tokens are its `encode_image`'s."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    family = WanFamily()
    model = models["wan21_i2v"]
    enc = family.load_encoders(model, torch.device("cpu"), torch.float32)
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    pixels[:, :, 0] = torch.round((pixels[:, :, 0] + 1) * 127.5) / 127.5 - 1  # a frame exact in uint8
    cond = family.encode_conditioning(enc, pixels, "concat")
    pipe = WanImageToVideoPipeline.from_pretrained(str(model), dtype=torch.float32)
    frame = Image.fromarray(((pixels[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    image = pipe.video_processor.preprocess(frame, height=32, width=32)
    _, condition = pipe.prepare_latents(image, 1, 16, 32, 32, 5, torch.float32, torch.device("cpu"),
                                        torch.Generator().manual_seed(0))
    assert torch.allclose(condition[0, 4:], cond["image_latents"], atol=1e-4)  # [mask (4), first-frame latents]
    assert torch.allclose(pipe.encode_image(frame, torch.device("cpu"))[0], cond["image_embeds"], atol=1e-4)

    seen = {}
    transformer = pipe.transformer
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    noisy = torch.randn(1, 16, 2, 4, 4)
    batch = family.condition_batch("concat", noisy, [{"latents": noisy[0], **cond}])
    family.forward(transformer, noisy, torch.tensor([0.5]), family.pad_text([torch.randn(3, 32)]), batch)
    assert torch.equal(seen["hidden_states"][:, :16], noisy)  # channels: noisy, mask, first-frame latents
    assert torch.equal(seen["hidden_states"][:, 16:20], condition[:, :4])  # the pipeline's mask
    assert torch.allclose(seen["hidden_states"][:, 20:], condition[:, 4:], atol=1e-4)
    assert seen["encoder_hidden_states_image"].shape == (1, 5, 32)


def test_ti2v_image_mode_gives_the_first_frame_clean_at_t_zero(models: dict[str, Path]) -> None:
    from diffusers import WanTransformer3DModel

    family = WanFamily()
    transformer = WanTransformer3DModel.from_pretrained(str(models["ti2v"] / "transformer"))
    seen = {}
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    latents, noisy = torch.randn(2, 48, 3, 2, 2), torch.randn(2, 48, 3, 2, 2)
    condition = family.condition_batch("first_frame", latents, [{}, {}])
    family.forward(transformer, noisy, torch.tensor([0.5, 0.8]), family.pad_text([torch.randn(3, 32)] * 2), condition)
    assert torch.equal(seen["hidden_states"][:, :, 0], latents[:, :, 0])
    assert torch.equal(seen["hidden_states"][:, :, 1:], noisy[:, :, 1:])
    # per-token timesteps as WanImageToVideoPipeline's expand_timesteps: 1 token per latent frame here
    assert seen["timestep"].tolist() == [[0.0, 500.0, 500.0], [0.0, 800.0, 800.0]]
    assert family.given_frames(condition) == 1


# About 30 s on a quiet 2-core machine: the studio's own start-up (job launcher, service, worker) is most of it.
def test_wan21_i2v_trains_through_a_studio_job_and_generates_with_studio_infer_image(
        tmp_path: Path, models: dict[str, Path]) -> None:
    """The real trainer (under the studio's launcher) and the real worker (under the studio's service)."""
    run = train_family(tmp_path, models["wan21_i2v"], video=True, via_studio=True, **{
        "dataset.frame_buckets": [1, 5], "sample.prompts": ["a green square"], "sample.steps": 2,
        "sample.width": 32, "sample.num_frames": 5, "sample.guidance_scale": 1.0})
    assert (run.run_dir / "samples" / run.save.name / "0.mp4").is_file()  # from the first clip's first frame
    from engine.lora import load_lora_state_dict

    keys = load_lora_state_dict(run.save / "adapter_model.safetensors")
    assert any(".cross_attn.k_img.lora_B" in k and v.abs().max() > 0 for k, v in keys.items())
    generate_family(tmp_path, models["wan21_i2v"], run.save, frames=5, image=start_image(tmp_path / "start.png"),
                    via_studio=True)


def test_wan22_i2v_a14b_trains_both_experts_and_generates_from_a_start_image(
        tmp_path: Path, models: dict[str, Path]) -> None:
    run = train_family(tmp_path, models["wan22_i2v"], **{"model.experts": "both", "model.boundary_ratio": 0.5,
                                                         "sample.prompts": ["a green square"], "sample.steps": 2,
                                                         "sample.width": 32, "sample.num_frames": 1,
                                                         "sample.guidance_scale": 1.0})
    assert (run.run_dir / "samples" / run.save.name / "0.mp4").is_file()
    assert sorted(p.name for p in run.save.glob("*.safetensors")) == ["high_noise_model.safetensors",
                                                                      "low_noise_model.safetensors"]
    generate_family(tmp_path, models["wan22_i2v"], run.save, image=start_image(tmp_path / "start.png"))


def test_ti2v_5b_trains_its_image_mode_and_generates_from_a_start_image(
        tmp_path: Path, models: dict[str, Path]) -> None:
    run = train_family(tmp_path, models["ti2v"], video=True, **{"model.image_to_video": True,
                                                                "dataset.resolutions": [64],
                                                                "dataset.frame_buckets": [1, 5],
                                                                "sample.prompts": ["a green square"], "sample.steps": 2,
                                                                "sample.num_frames": 5, "sample.guidance_scale": 1.0})
    assert (run.run_dir / "samples" / run.save.name / "0.mp4").is_file()
    generate_family(tmp_path, models["ti2v"], run.save, size=64, frames=5, image=start_image(tmp_path / "start.png", 64))


def test_a_text_to_video_model_refuses_a_start_image_and_an_i2v_model_needs_one(
        tmp_path: Path, models: dict[str, Path]) -> None:
    from engine.inference.pipeline import PipelineCache

    cache = PipelineCache("cpu")
    for name, image, message in (("t2v", object(), "takes no start image"), ("wan22_i2v", None, "give a start image")):
        loaded, _ = cache.get(models[name])
        with pytest.raises(ValueError, match=message):
            loaded.pipe_for(image)
        cache.free_all()


def test_start_image_reaches_the_request_from_the_cli_the_api_and_the_infer_tab(tmp_path: Path, api) -> None:
    """The CLI takes a local file; the API and the Infer tab take only the user's own uploaded images."""
    import argparse

    from studio.auth import User
    from studio.cli.infer import build_request, register
    from tabs.infer import with_start_image

    image = start_image(tmp_path / "start.png")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["infer", "--prompt", "p", "--image", str(image)])
    assert build_request(args).image == str(image.resolve())

    alice, bob = User("alice", False), User("bob", False)
    req = with_start_image(api, alice, {"prompt": "a green square", "image": str(image)})
    assert req["image"].startswith("image:") and api.start_image(alice, req["image"]).read_bytes() == image.read_bytes()
    rid = api.generate(alice, req)["request_id"]
    assert api.ctx.inference.status(rid)["request"]["image"] == str(api.start_image(alice, req["image"]))
    with pytest.raises(ValueError, match="upload the start image"):  # no other path of the server
        api.generate(alice, {"prompt": "x", "image": str(image)})
    with pytest.raises(FileNotFoundError):  # nor another user's upload
        api.start_image(bob, req["image"])


def test_image_to_video_presets_load_and_validate(tmp_path: Path) -> None:
    from studio.presets import WAN_PRESETS, load_preset

    names = ("Wan2.1 I2V 14B · 480p · 80 GB", "Wan2.2 I2V A14B · both experts · 80 GB",
             "Wan2.2 TI2V-5B · image-to-video · 720p")
    assert set(names) <= set(WAN_PRESETS)
    loaded = {name: load_preset(name, tmp_path / "runs", tmp_path) for name in names}
    from engine.config import DirectoryConfig

    for cfg in loaded.values():  # the Train tab adds the dataset folder
        cfg.dataset.directory = [DirectoryConfig(path=str(tmp_path))]
        cfg.validate()
    assert loaded["Wan2.2 TI2V-5B · image-to-video · 720p"].model.image_to_video is True
    assert loaded["Wan2.2 I2V A14B · both experts · 80 GB"].model.experts == "both"
