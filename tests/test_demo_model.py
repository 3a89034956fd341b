"""The committed demo model: a real diffusers Wan pipeline, loaded by name, generating the requested clip."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from engine.demo.evaluate import read_clip
from engine.demo.setup import DEMO_DATASET_CLIPS, demo_lora_config_text, ensure_demo_assets
from engine.demo.world import sample_specs
from engine.models import resolve_model


def test_demo_model_is_a_small_standard_wan_folder():
    path = resolve_model("demo")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024, f"demo model is {total / 2**20:.1f} MiB"


def test_demo_model_generates_the_requested_size_and_length():
    pipe = WanPipeline.from_pretrained(str(resolve_model("demo")))
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        "a red circle moving left on a black background",
        height=48,
        width=64,
        num_frames=9,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    frames = np.asarray(output.frames[0])
    assert frames.shape == (9, 48, 64, 3)
    assert np.isfinite(frames).all() and frames.std() > 0.01  # a picture, not a constant
    assert read_clip(frames).background is not None


def test_demo_dataset_is_created_once_and_config_points_at_it(tmp_path: Path):
    folder = ensure_demo_assets(tmp_path)
    clips = sorted(folder.glob("*.mp4"))
    assert len(clips) == DEMO_DATASET_CLIPS
    assert {c.with_suffix(".txt").read_text().split(" moving")[0] for c in clips} == {"a purple star"}
    stamp = clips[0].stat().st_mtime_ns
    assert ensure_demo_assets(tmp_path) == folder and clips[0].stat().st_mtime_ns == stamp  # idempotent
    clips[0].unlink()  # an incomplete folder is rebuilt
    assert len(list(ensure_demo_assets(tmp_path).glob("*.mp4"))) == DEMO_DATASET_CLIPS

    from engine.config import TrainConfig

    config = TrainConfig.from_toml_string(demo_lora_config_text(tmp_path)).validate()
    assert Path(config.dataset.directory[0].path) == folder.resolve()
    assert config.model.ckpt_path == "demo"


def test_demo_cli_prepares_and_generates(tmp_path: Path):
    import subprocess
    import sys

    from engine.media import read_video

    repo = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "studio", "--home", str(tmp_path / "home"), "demo"]
    prepared = subprocess.run(base + ["--prepare"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert (tmp_path / "home" / "demo_lora.toml").is_file()
    out = tmp_path / "clip.mp4"
    prompt = "a blue square moving down on a white background"
    generated = subprocess.run(base + ["--generate", prompt, "--steps", "2", "--out", str(out)],
                               cwd=repo, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    assert read_video(out).shape == (17, 64, 64, 3)
    assert json.loads(generated.stdout.strip().splitlines()[-1])["video"] == str(out)


def test_demo_tokenizer_knows_every_caption_word_including_the_held_out_ones():
    from transformers import AutoTokenizer

    from engine.demo.world import caption_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model("demo") / "tokenizer"))
    ids = tokenizer("a purple star moving up on a gray background").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) == 10  # one token per word + </s>
    assert all(tokenizer.convert_tokens_to_ids(w) != tokenizer.unk_token_id for w in caption_vocabulary())
    assert tokenizer.unk_token_id in tokenizer("a pink circle").input_ids


def test_demo_build_refuses_a_wrong_init_folder_or_clip_length(tmp_path: Path, capsys):
    """A typo in --init must not silently train from scratch; a VAE crop must be a Wan length (4k+1); a
    share is a share."""
    import pytest

    from engine.demo.build_cli import main

    for argv, expected in [(["--init", str(tmp_path / "nope")], "no vae or transformer folder"),
                           (["--vae-clip-frames", "8"], "must be 4k+1"),
                           (["--unnamed-colors", "30"], "from 0 to 1, got 30.0"),
                           (["--focus-share", "0.3"], "go together"),
                           (["--focus", "blue star", "--focus-share", "1"], "go together")]:
        with pytest.raises(SystemExit) as info:
            main(["--preset", "smoke", "--work-dir", str(tmp_path / "work"), *argv])
        assert info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before any stage ran


def test_demo_build_flags_override_the_preset(tmp_path: Path, monkeypatch):
    """--seed gives a continued build fresh clips (the pool is rendered from it); flags reach the stages."""
    from engine.demo import build_cli

    seen = {}
    monkeypatch.setattr(build_cli, "run", lambda stages, work, out, settings, device: seen.update(settings=settings))
    build_cli.main(["--preset", "smoke", "--work-dir", str(tmp_path), "--stages", "text", "--seed", "9",
                    "--pool-clips", "32"])
    assert (seen["settings"].seed, seen["settings"].pool_clips) == (9, 32)


def test_demo_build_trains_the_vae_on_every_caption_and_the_transformer_on_the_base_split(tmp_path: Path):
    """The VAE is the codec: trained without stars it rounded their points, so no LoRA could draw one.
    The transformer's pool must still hold nothing of the held-out color."""
    from dataclasses import replace

    from engine.demo.build_model import PRESETS, _load_pool
    from engine.demo.world import HELD_OUT_COLOR, SHAPES

    settings = replace(PRESETS["smoke"], pool_clips=48)
    vae_coverage, vae_specs = _load_pool(tmp_path, settings, every_shape=True)
    coverage, specs = _load_pool(tmp_path, settings)
    assert HELD_OUT_COLOR in {s.color for s in vae_specs} and {s.shape for s in vae_specs} == set(SHAPES)
    assert HELD_OUT_COLOR not in {s.color for s in specs}
    assert len(vae_coverage) == len(coverage) == 48 and not np.array_equal(vae_coverage, coverage)
    assert _load_pool(tmp_path, settings, every_shape=True)[1] == vae_specs  # cached per split


def _reconstructions(held_out: bool, count: int = 2):
    from engine.demo.sampling import score_reconstructions

    vae = WanPipeline.from_pretrained(str(resolve_model("demo"))).vae
    return score_reconstructions(vae, count, held_out=held_out)


@pytest.mark.heavy  # about a minute on 2 busy cores: `make test-heavy`
def test_demo_vae_reconstructs_the_base_shapes_frame_by_frame():
    """The codec's own ceiling: encoded and decoded ground truth keeps color, shape and motion."""
    assert all(s.color_ok and s.shape_ok and s.motion_ok and s.observed.presence == 1.0
               for s in _reconstructions(held_out=False))


@pytest.mark.heavy
def test_demo_vae_reconstructs_the_held_out_star():
    """The LoRA can only draw a star as well as the VAE decodes one. The VAE trained without stars
    reconstructed none of 12 as a star; trained on every shape, then its decoder alone tuned, 7 of 12;
    the decoder tuned again with each clip's error scaled by its inverse contrast, 9 of 12 (the rest,
    small stars on gray, keep size and place but read as rounder blobs: docs/demo.md). Raise the bound
    as the VAE gets better."""
    scores = _reconstructions(held_out=True, count=12)
    assert all(s.color_ok and s.motion_ok and s.observed.presence == 1.0 for s in scores)
    assert sum(s.shape_ok for s in scores) >= 9, [s.observed.shape for s in scores]


def test_first_frames_weight_scales_latent_frames_0_and_1_and_keeps_the_loss_scale():
    from engine.demo.build_model import _frame_weights

    weights = _frame_weights(5, 3.0, torch.device("cpu")).flatten()
    assert torch.allclose(weights.mean(), torch.tensor(1.0))
    assert torch.allclose(weights[:2], 3 * weights[2:].mean()) and torch.equal(weights[2:], weights[2:].flip(0))
    assert torch.equal(_frame_weights(5, 1.0, torch.device("cpu")).flatten(), torch.ones(5))


def test_equal_contrast_weighs_a_faint_shape_up_to_the_floor_and_leaves_a_strong_one():
    from engine.demo import world
    from engine.demo.build_model import _contrast_scale

    def rgb(*names):
        return torch.tensor([{**world.COLORS, **world.BACKGROUNDS}[n] for n in names], dtype=torch.float32)

    scale = _contrast_scale(rgb("purple", "purple", "red"), rgb("white", "gray", "red"))
    assert scale[0] == 1.0  # purple on white: 232 apart
    assert 1.7 < scale[1] < 1.9  # purple on gray: 110 apart
    assert torch.isclose(scale[2], torch.tensor(1 / 0.3))  # no contrast: capped


def test_unnamed_colors_stay_away_from_the_held_out_color_and_drop_the_color_word():
    from engine.demo.build_model import unnamed_color_clips
    from engine.demo.build_parts import palette_colors
    from engine.demo.world import COLORS, HELD_OUT_COLOR

    specs = sample_specs(400, seed=5)
    fg, bg = palette_colors(specs)
    before = fg.clone()
    recolored = unnamed_color_clips(fg, bg, 0.5, seed=5)
    assert 0.4 < recolored.float().mean() < 0.6
    assert torch.equal(fg[~recolored], before[~recolored])
    assert (fg[recolored] - torch.tensor(COLORS[HELD_OUT_COLOR]).float()).norm(dim=1).min() >= 110
    assert (fg[recolored] - bg[recolored]).norm(dim=1).min() >= 90
    caption = specs[0].caption
    assert caption.text(with_color=False) == caption.text().replace(f" {caption.color}", "", 1)


def test_focus_draws_from_the_named_clips_and_refuses_a_caption_the_pool_lacks():
    from engine.demo.build_model import BuildSettings, focus_indices

    prompts = ["a blue star moving up on a gray background", "a red circle moving left on a black background"]
    data = {"caption_index": torch.tensor([1, 0, 1, 0, 1]), "prompts": prompts}
    assert focus_indices(data, BuildSettings()).tolist() == [0, 1, 2, 3, 4]  # no focus: every clip
    assert focus_indices(data, BuildSettings(focus="blue star", focus_share=0.25)).tolist() == [1, 3]
    with pytest.raises(SystemExit, match="matches no caption"):
        focus_indices(data, BuildSettings(focus="green star", focus_share=0.25))
    with pytest.raises(SystemExit, match="latents stage again"):
        focus_indices({"caption_index": data["caption_index"]}, BuildSettings(focus="blue star", focus_share=0.25))
