"""Deliberately broken shapes-world clips, made by code: each fails the way generated clips have failed
(fading, vanishing after a few frames, color drift, shapeless blobs, empty frames, no motion). The
evaluator must fail every one of them (tests/test_demo_evaluate.py). `rough_star` is the other side: an
imperfect star that a person still reads as a star, and so must the evaluator."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from engine.demo import world


def compose(spec: world.ClipSpec, coverage: np.ndarray, colors: np.ndarray | None = None) -> np.ndarray:
    """Coverage (T, H, W) in [0, 1] over the spec's background; colors (T, 3) per frame, else the spec's color."""
    background = np.array(world.BACKGROUNDS[spec.background], dtype=np.float32)
    if colors is None:
        colors = np.tile(np.array(world.COLORS[spec.color], dtype=np.float32), (len(coverage), 1))
    cov = coverage[..., None]
    return np.rint(background * (1 - cov) + colors[:, None, None, :] * cov).astype(np.uint8)


def fading(spec: world.ClipSpec) -> np.ndarray:
    """The object's contrast falls linearly to 15% by the last frame."""
    ramp = np.linspace(1.0, 0.15, spec.num_frames)[:, None, None]
    return compose(spec, world.render_coverage(spec) * ramp)


def vanishing(spec: world.ClipSpec) -> np.ndarray:
    """Three good frames, then an almost empty clip with a faint smudge (the first demo LoRA's failure)."""
    coverage = world.render_coverage(spec)
    coverage[3:] *= 0.12
    return compose(spec, coverage)


def color_drift(spec: world.ClipSpec, towards: str = "green") -> np.ndarray:
    """The color slides from the prompted one to another palette color over the clip."""
    target = "red" if towards == spec.color else towards
    start, end = (np.array(world.COLORS[c], dtype=np.float32) for c in (spec.color, target))
    mix = np.linspace(0.0, 1.0, spec.num_frames)[:, None]
    return compose(spec, world.render_coverage(spec), start * (1 - mix) + end * mix)


def blurred_blob(spec: world.ClipSpec, sigma: float = 4.0) -> np.ndarray:
    """The right color and motion, but a soft smudge: corners and tips gone (a blurred circle still
    looks round, so the table below uses it only for shapes with corners)."""
    frames = [Image.fromarray(np.uint8(np.rint(c * 255))).filter(ImageFilter.GaussianBlur(sigma))
              for c in world.render_coverage(spec)]
    coverage = np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in frames])
    return compose(spec, np.clip(coverage * 1.6, 0.0, 1.0))  # keep the core fully colored


def lumpy_blob(spec: world.ClipSpec, seed: int = 0) -> np.ndarray:
    """Sharp edges, right color and motion, but an irregular potato of the shape's size."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 7, endpoint=False)
    return _polygon_clip(spec, angles, spec.radius * rng.uniform(0.35, 1.4, size=angles.size))


def rough_star(spec: world.ClipSpec, seed: int = 0) -> np.ndarray:
    """Not broken: a star as a generator draws one, tilted, with uneven points and shallow notches. A
    person reads it as a star at once, though it overlaps the world's star at a soft IoU below 0.8."""
    rng = np.random.default_rng(seed)
    angles = np.deg2rad(-90 + 12 + 36 * np.arange(10))
    outer = spec.radius * 1.15 * rng.uniform(0.8, 1.15, size=5)
    radii = np.stack([outer, outer * 0.5], axis=1).ravel()
    return _polygon_clip(spec, angles, radii)


def fat_star(spec: world.ClipSpec, seed: int = 0) -> np.ndarray:
    """Not broken: a plump star as the demo model draws blue ones, shallow notches, stretched a quarter
    along a random axis. A person reads it as a star; its 5-fold harmonic barely beats the stretch's."""
    rng = np.random.default_rng(seed)
    tilt = rng.uniform(0, 2 * np.pi)
    angles = tilt + np.deg2rad(36 * np.arange(10))
    outer = spec.radius * rng.uniform(0.9, 1.1, size=5)
    radii = np.stack([outer, outer * 0.62], axis=1).ravel()
    axis = rng.uniform(0, np.pi)
    x, y = radii * np.cos(angles - axis) * 1.25, radii * np.sin(angles - axis)
    return _polygon_clip(spec, np.arctan2(y, x) + axis, np.hypot(x, y))


def _polygon_clip(spec: world.ClipSpec, angles: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """The spec's clip with its shape replaced by a polygon (vertex angles and radii about the centre)."""
    scale = 4
    coverage = []
    for index in range(spec.num_frames):
        cx, cy = spec.center(index)
        canvas = Image.new("L", (spec.width * scale, spec.height * scale), 0)
        points = [((cx + r * np.cos(a)) * scale, (cy + r * np.sin(a)) * scale) for a, r in zip(angles, radii)]
        ImageDraw.Draw(canvas).polygon(points, fill=255)
        big = np.asarray(canvas, dtype=np.float32) / 255.0
        coverage.append(big.reshape(spec.height, scale, spec.width, scale).mean(axis=(1, 3)))
    return compose(spec, np.stack(coverage))


def empty_frames(spec: world.ClipSpec, frames: tuple[int, ...] = (5, 10, 14)) -> np.ndarray:
    """The object is missing from a few frames."""
    coverage = world.render_coverage(spec)
    coverage[list(frames)] = 0.0
    return compose(spec, coverage)


def standing_still(spec: world.ClipSpec) -> np.ndarray:
    """A perfect shape that never moves."""
    from dataclasses import replace

    return world.render_clip(replace(spec, travel=0.0))


ANY_SHAPE = frozenset(world.SHAPES)
WITH_CORNERS = frozenset({"square", "triangle", "star"})
BROKEN = {  # name -> (make clip, the attribute the evaluator must fail, prompted shapes it applies to)
    "fading": (fading, "color", ANY_SHAPE),
    "vanishing": (vanishing, "present", ANY_SHAPE),
    "color_drift": (color_drift, "color", ANY_SHAPE),
    "blurred_blob": (blurred_blob, "shape", WITH_CORNERS),
    "lumpy_blob": (lumpy_blob, "shape", ANY_SHAPE),
    "empty_frames": (empty_frames, "present", ANY_SHAPE),
    "standing_still": (standing_still, "motion", ANY_SHAPE),
}
