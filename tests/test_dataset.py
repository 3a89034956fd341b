"""engine.dataset, the one dataset model: what the studio's check shows is what the trainer trains.
Fixtures have the shapes of diffusion-pipe's example files (tests/fixtures/diffusion_pipe)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import DatasetConfig, DirectoryConfig
from engine.dataset import DatasetError, plan_dataset, require_trainable
from tests.trainer_support import of_kind, read_events, run_trainer, trainer_cmd, write_video

DIFFUSION_PIPE = Path(__file__).resolve().parent / "fixtures" / "diffusion_pipe"


def image(path: Path, size: tuple[int, int] = (64, 64), colour: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path


def plan_of(folder: Path, **kw):
    return plan_dataset(DatasetConfig(directory=[DirectoryConfig(path=str(folder))], resolutions=[64], **kw))


def test_caption_sources_in_their_documented_precedence(tmp_path: Path) -> None:
    image(tmp_path / "a.png"), image(tmp_path / "b.tiff"), image(tmp_path / "sub" / "c.jpg"), image(tmp_path / "d.png")
    for name in ("a", "b", "d"):
        (tmp_path / f"{name}.txt").write_text(f"txt {name}")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": ["json a1", "json a2"]}))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.tiff", "text": "meta b"}\n'
                                             '{"file_name": "sub/c.jpg", "text": "meta c"}\n')
    plan = plan_of(tmp_path)
    items = {e.name: e.item for e in plan.entries}
    assert (items["a.png"].captions, items["a.png"].caption_source) == (["json a1", "json a2"], "captions.json")
    assert (items["b.tiff"].caption, items["b.tiff"].caption_source) == ("meta b", "metadata.jsonl")
    assert (items["sub/c.jpg"].caption, items["d.png"].caption) == ("meta c", "txt d")
    assert sorted(s.caption for s in plan.samples) == ["json a1", "json a2", "meta b", "meta c", "txt d"]
    from studio.datasets import save_caption

    with pytest.raises(DatasetError, match="comes from captions.json"):
        save_caption(tmp_path, "a.png", "edited")  # a .txt would not win: refused, not silently ignored


def test_short_videos_are_skipped_by_name_or_kept_as_stills(tmp_path: Path) -> None:
    write_video(tmp_path / "short.mp4", frames=9, size=64)
    write_video(tmp_path / "long.mp4", frames=18, size=64)
    plan = plan_of(tmp_path, frame_buckets=[1, 17])
    by_name = {e.name: e for e in plan.entries}
    assert by_name["long.mp4"].buckets[0].frames == 17
    assert by_name["short.mp4"].skipped.startswith("9 frames, shorter than every video frame bucket (17)")
    assert any("short.mp4" in w and "9 frames" in w for w in plan.warnings)
    still = {e.name: e for e in plan_of(tmp_path, frame_buckets=[1, 17], short_videos="still").entries}
    assert still["short.mp4"].buckets[0].frames == 1 and not still["short.mp4"].skipped
    with pytest.raises(DatasetError, match="no trainable item, 2 media files .*9 frames"):
        require_trainable(plan_of(tmp_path, frame_buckets=[1, 33]), str(tmp_path))


def test_a_compress_folder_zip_and_directory_overrides(tmp_path: Path) -> None:
    from studio.datasets import import_uploads

    src = tmp_path / "My Photos"
    image(src / "wide.png", (96, 48)), image(src / "tall.png", (48, 96))
    archive = tmp_path / "My Photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"My Photos/{f.name}")
        zf.writestr("__MACOSX/My Photos/._wide.png", b"junk")
    dest = tmp_path / "upload"
    import_uploads([str(archive)], dest, 1 << 20)
    plan = plan_dataset(DatasetConfig(resolutions=[64], directory=[
        DirectoryConfig(path=str(dest)),
        DirectoryConfig(path=str(dest), num_repeats=3, ar_buckets=[[64, 64]], resolutions=[[128, 32]])]))
    first = {e.name: e.buckets for e in plan.entries[:2]}
    assert set(first) == {"My Photos/wide.png", "My Photos/tall.png"}
    assert first["My Photos/wide.png"][0].width > first["My Photos/wide.png"][0].height
    assert [str(e.buckets[0]) for e in plan.entries[2:]] == ["64x64x1", "64x64x1"]  # [128, 32] = a 64^2 area
    assert plan.bucket_counts()[plan.entries[2].buckets[0]] == 6 and plan.steps_per_epoch(2) == 5


def test_diffusion_pipe_example_trains_on_the_demo_model_with_eval_loss(tmp_path: Path) -> None:
    """The Wan example (paths changed only) validates, the check and the trainer agree, and the eval
    loss is written before the first step and after the epoch."""
    for name in ("wan_min_vram.toml", "dataset.toml", "eval_dataset.toml"):
        text = (DIFFUSION_PIPE / name).read_text().replace("OUTPUT_DIR", str(tmp_path / "out"))
        (tmp_path / name).write_text(text)
    (tmp_path / "media").mkdir()
    write_video(tmp_path / "media" / "clip.mp4", frames=17, size=64)
    write_video(tmp_path / "media" / "blink.mp4", frames=5, size=64)  # shorter than 17: skipped, named
    image(tmp_path / "media" / "frame.tiff", (80, 48))
    (tmp_path / "media" / "captions.json").write_text(json.dumps({"clip.mp4": ["a yellow bar moving right"],
                                                                  "frame.tiff": ["a grey frame"]}))
    image(tmp_path / "stills" / "star.png")
    (tmp_path / "stills" / "metadata.jsonl").write_text('{"file_name": "star.png", "text": "a grey square"}\n')
    image(tmp_path / "eval" / "held.png", colour=200)
    (tmp_path / "eval" / "held.txt").write_text("a light square")
    from engine.config import TrainConfig
    from studio.datasets import check

    cfg = TrainConfig.from_toml_file(tmp_path / "wan_min_vram.toml").validate()
    preview = check(cfg.dataset)
    assert preview["samples"] == 4 and preview["steps_per_epoch"] == 4  # clip + tiff + star x 2 repeats
    result = run_trainer(trainer_cmd(tmp_path / "wan_min_vram.toml", tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = read_events(tmp_path / "run")
    start = of_kind(events, "start")[0]
    assert start["num_samples"] == len(plan_dataset(cfg.dataset).samples) == 3
    assert start["steps_per_epoch"] == preview["steps_per_epoch"]
    warnings = [e["message"] for e in of_kind(events, "warning")]
    assert any("blink.mp4" in w and "5 frames" in w for w in warnings)
    assert sum(w.startswith("blocks_to_swap:") for w in warnings) == 1
    evals = of_kind(events, "eval")
    assert [e["step"] for e in evals] == [0, 4] and all(e["name"] == "held_out" and e["samples"] == 1 for e in evals)
    assert all(np.isfinite(e["loss"]) for e in evals)
