"""The shapes world: short deterministic clips of one colored shape moving over a plain background.

Every clip is fully described by a `ClipSpec`; the same spec always renders the same pixels, and
`sample_specs` derives specs from a seed, so datasets are reproducible. The held-out concept, the
color "purple", never appears in base training specs; the held-out prompts (and the demo LoRA's
clips) are purple stars, a shape the base split draws in the other colors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.media import write_video

log = logging.getLogger(__name__)

# Foreground palette (RGB). Purple is the held-out color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 35),
    "purple": (150, 40, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

HELD_OUT_COLOR = "purple"
# The shape of the held-out prompts. The base split has stars in the other colors: a LoRA trained in
# minutes on 12 clips teaches a new color on a known shape, and did not teach a star's points to a model
# that had never drawn one (docs/demo.md).
HELD_OUT_PROMPT_SHAPE = "star"

WIDTH = 64
HEIGHT = 64
NUM_FRAMES = 17  # Wan frame counts are 4k+1
FPS = 16
_SUPERSAMPLE = 4  # render at 4x and average down: anti-aliased edges like real video
STAR_INNER_RATIO = 0.4  # deep notches keep the star's silhouette far from the triangle's

_CAPTION_RE = re.compile(
    r"^\s*an? (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+) on an? (?P<background>\w+) background\s*\.?\s*$",
    re.IGNORECASE,
)


class CaptionError(ValueError):
    """A prompt that does not follow the shapes-world caption template."""


@dataclass(frozen=True)
class Caption:
    color: str
    shape: str
    direction: str
    background: str

    def text(self, *, with_color: bool = True) -> str:
        """The caption; with_color=False leaves the color word out (the demo build's unnamed colors)."""
        color = f"{self.color} " if with_color else ""
        return f"a {color}{self.shape} moving {self.direction} on a {self.background} background"


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; positions are shape centers in pixels."""

    color: str
    shape: str
    direction: str
    background: str
    radius: float
    start_x: float
    start_y: float
    travel: float  # pixels covered from the first to the last frame
    width: int = WIDTH
    height: int = HEIGHT
    num_frames: int = NUM_FRAMES

    @property
    def caption(self) -> Caption:
        return Caption(self.color, self.shape, self.direction, self.background)

    def center(self, frame: int) -> tuple[float, float]:
        progress = self.travel * frame / max(self.num_frames - 1, 1)
        dx, dy = _DIRECTION_VECTORS[self.direction]
        return self.start_x + dx * progress, self.start_y + dy * progress


_DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),  # image rows grow downwards
    "down": (0, 1),
}


def parse_caption(prompt: str) -> Caption:
    """Parse 'a red circle moving left on a black background' into its four attributes."""
    match = _CAPTION_RE.match(prompt)
    if not match:
        raise CaptionError(
            f"prompt {prompt!r} does not follow 'a <color> <shape> moving <direction> on a <background> background'"
        )
    caption = Caption(**{k: v.lower() for k, v in match.groupdict().items()})
    _check_vocabulary(caption)
    return caption


def _check_vocabulary(caption: Caption) -> None:
    for value, allowed, what in (
        (caption.color, COLORS, "color"),
        (caption.shape, SHAPES, "shape"),
        (caption.direction, DIRECTIONS, "direction"),
        (caption.background, BACKGROUNDS, "background"),
    ):
        if value not in allowed:
            raise CaptionError(f"unknown {what} {value!r}; known: {', '.join(allowed)}")


def caption_vocabulary() -> list[str]:
    """Every word a shapes-world caption can contain (for the demo tokenizer)."""
    words = ["a", "an", "moving", "on", "background"]
    words += list(COLORS) + list(SHAPES) + list(DIRECTIONS) + [b for b in BACKGROUNDS if b not in COLORS]
    return list(dict.fromkeys(words))


def make_spec(caption: Caption, rng: np.random.Generator, size: int = WIDTH, num_frames: int = NUM_FRAMES) -> ClipSpec:
    """Random placement, size and speed for a caption, keeping the shape fully inside the frame."""
    radius = float(rng.uniform(0.14, 0.20) * size)
    travel = float(rng.uniform(0.35, 0.50) * size)
    margin = radius + 1.0
    dx, dy = _DIRECTION_VECTORS[caption.direction]
    start = []
    for step in (dx, dy):
        if step == 0:
            start.append(float(rng.uniform(margin, size - margin)))
        elif step > 0:
            start.append(float(rng.uniform(margin, size - margin - travel)))
        else:
            start.append(float(rng.uniform(margin + travel, size - margin)))
    return ClipSpec(
        color=caption.color,
        shape=caption.shape,
        direction=caption.direction,
        background=caption.background,
        radius=radius,
        start_x=start[0],
        start_y=start[1],
        travel=travel,
        width=size,
        height=size,
        num_frames=num_frames,
    )


def all_captions(*, held_out: bool | None = False) -> list[Caption]:
    """Every valid caption. held_out=False: base training vocabulary only (no held-out color); True:
    only the held-out prompts (held-out color and HELD_OUT_PROMPT_SHAPE); None: everything."""
    captions = [
        Caption(color, shape, direction, background)
        for color in COLORS
        for shape in SHAPES
        for direction in DIRECTIONS
        for background in BACKGROUNDS
    ]
    if held_out is None:
        return captions
    if held_out:
        return [c for c in captions if is_held_out(c)]
    return [c for c in captions if c.color != HELD_OUT_COLOR]


def is_held_out(caption: Caption) -> bool:
    return caption.color == HELD_OUT_COLOR and caption.shape == HELD_OUT_PROMPT_SHAPE


def sample_specs(
    count: int, seed: int, *, held_out: bool | None = False, size: int = WIDTH, num_frames: int = NUM_FRAMES
) -> list[ClipSpec]:
    """`count` specs cycling through every caption of the chosen split (see `all_captions`; None: every
    caption) in a seed-shuffled order."""
    rng = np.random.default_rng(seed)
    captions = all_captions(held_out=held_out)
    specs = []
    order: list[int] = []
    for _ in range(count):
        if not order:
            order = list(rng.permutation(len(captions)))
        specs.append(make_spec(captions[order.pop()], rng, size=size, num_frames=num_frames))
    return specs


def render_clip(spec: ClipSpec) -> np.ndarray:
    """Render a clip as uint8 frames of shape (num_frames, height, width, 3)."""
    coverage = render_coverage(spec)[..., None]
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    foreground = np.array(COLORS[spec.color], dtype=np.float32)
    return np.rint(background * (1 - coverage) + foreground * coverage).astype(np.uint8)


def render_coverage(spec: ClipSpec) -> np.ndarray:
    """Per-pixel shape coverage in [0, 1], shape (num_frames, height, width): colors can be composed later."""
    return np.stack([_coverage(spec, *spec.center(index)) for index in range(spec.num_frames)])


def _coverage(spec: ClipSpec, cx: float, cy: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape, from a supersampled binary drawing."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (spec.width * s, spec.height * s), 0)
    draw = ImageDraw.Draw(canvas)
    points = shape_outline(spec.shape, cx * s, cy * s, spec.radius * s)
    if spec.shape == "circle":
        r = spec.radius * s
        draw.ellipse((cx * s - r, cy * s - r, cx * s + r, cy * s + r), fill=255)
    else:
        draw.polygon(points, fill=255)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    return big.reshape(spec.height, s, spec.width, s).mean(axis=(1, 3))


def shape_outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy); circles get a fine polygon (used only for sizing)."""
    if shape == "square":
        half = radius * 0.85  # similar area to the circle of the same radius
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        radii = np.full(3, radius * 1.1)
        # Shift down so the bounding box is centred on (cx, cy).
        return [(cx + r * np.cos(a), cy + r * np.sin(a) + radius * 0.275) for a, r in zip(angles, radii)]
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.15, radius * 1.15 * STAR_INNER_RATIO)
        return [(cx + r * np.cos(a), cy + r * np.sin(a) + radius * 0.1) for a, r in zip(angles, radii)]
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def write_clip_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """Write frames as H.264 yuv420p mp4 (what browsers and gr.Video play without transcoding).
    CRF 12, one x264 thread and no faststart are what the world's datasets were always written with,
    so existing and new clips stay byte-identical."""
    write_video(frames, path, fps, crf=12, preset="medium", threads=1, faststart=False)


def write_dataset(folder: Path, specs: list[ClipSpec], *, prefix: str = "clip") -> list[Path]:
    """Write clips in the studio dataset format: `<name>.mp4` next to `<name>.txt` (the caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, spec in enumerate(specs):
        stem = folder / f"{prefix}_{index:04d}"
        write_clip_mp4(render_clip(spec), stem.with_suffix(".mp4"))
        stem.with_suffix(".txt").write_text(spec.caption.text() + "\n", encoding="utf-8")
        paths.append(stem.with_suffix(".mp4"))
    log.info("wrote %d clips to %s", len(specs), folder)
    return paths
