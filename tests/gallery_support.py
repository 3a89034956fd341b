"""Helpers for the gallery tests (no tests here): an item with a real mp4 and poster, added as the
inference service adds one."""
from __future__ import annotations

import numpy as np

from engine.gallery import Gallery
from engine.inference.export import write_mp4, write_poster


def add(gallery: Gallery, name: str, *, owner: str = "alice", prompt: str = "a purple star", model: str = "demo",
        loras: list[dict] | None = None, seed: int = 1, image: str | None = None):
    media = gallery.staging_dir(name)
    frames = np.full((5, 32, 48, 3), seed % 255, dtype=np.uint8)
    write_mp4(frames, media / "video.mp4", fps=8)
    write_poster(frames[0], media / "poster.png")
    params = {"model": model, "prompt": prompt, "negative_prompt": "", "loras": loras or [], "width": 48,
              "height": 32, "num_frames": 5, "steps": 2, "guidance_scale": 5.0, "flow_shift": 3.0, "fps": 8,
              "num_videos": 1, "fuse_loras": False, "seed": seed, "image": image}
    return gallery.add(owner=owner, params=params, seed=seed, media_dir=media, timings={"denoise_s": 1.5},
                       digest=f"d{seed}", request_id="r1")
