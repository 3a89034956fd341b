"""Score a shapes-world clip against its prompt from the pixels alone, frame by frame.

A person watching a clip of "a red square moving up" fails it when the square is missing from some
frames, fades or changes color, is a shapeless blob, or wanders. So every frame is read on its own:
- presence: enough pixels differ from the background (area within bounds) and the object's core
  differs from the background by a visible contrast;
- color: the core's color lies within a tolerance of a palette color (a faded or drifting color is
  no color at all);
- shape: the silhouette is matched against the world's own shapes, scaled to the same area and
  centred on the same point; the best match counts only when it overlaps well (soft IoU), so a
  blurred or lumpy blob reads as no shape. A star also counts when its outline has five clear points
  (see `_five_fold`): its thin points make overlap a harsh judge of a star a person reads at once;
- motion: the centroid's steps between frames go the prompted way.
A clip shows an attribute only when it holds in nearly every frame (`NEARLY_EVERY`). Tested on
ground-truth clips (all read) and on deliberately broken ones (all fail): tests/test_demo_evaluate.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from engine.demo import world
from engine.demo.world import BACKGROUNDS, COLORS, SHAPES, Caption, parse_caption

NEARLY_EVERY = 0.85  # a clip attribute holds in at least this share of frames (15 of 17)
_MIN_CONTRAST = 60.0  # RGB distance below which a pixel counts as background
_MIN_OBJECT_CONTRAST = 80.0  # the object's core must differ at least this much from the background
_MIN_AREA = 40  # pixels: a third of the smallest shape the world draws
_MAX_AREA_FRACTION = 0.35  # of the frame: twice the largest shape the world draws
_COLOR_TOLERANCE = 60.0  # RGB distance to the palette color; palette colors lie >= 125 apart
_SHAPE_FIT = 0.8  # soft IoU with the best-matching shape: ground truth fits at >= 0.9, an irregular potato at <= 0.77
_MIN_TRAVEL = 8.0  # pixels over the clip along the direction; the world moves shapes 22-32 pixels
_BACKWARD_SLACK = 1.0  # pixels a single step may go against the direction (centroid jitter)
_NOISE_ALPHA = 0.15
# Five points: the outline's radius around the centroid, as a function of angle, has a strong 5-fold
# harmonic (relative to the mean radius; the world's star 0.33-0.35, a blurred star 0.01-0.02) that
# dominates every other harmonic 1-9 (an irregular potato's low harmonics dominate: 0.2 against 0.04).
_FIVE_FOLD_MIN = 0.15
_FIVE_FOLD_DOMINANCE = 1.2
# Five points counted as a person counts them: peaks of the smoothed radius profile that rise at least
# _POINT_DEPTH of the mean radius above the notches on both sides, five of them, neighbours 45-100 degrees
# apart (72 when even). It reads fat, stretched or lopsided stars whose 5-fold harmonic a 2- or 3-fold one
# rivals; a potato's tallest bumps are not five evenly spread ones (0 of 2,040 potato frames).
_POINT_DEPTH = 0.12
_POINT_GAPS = (45.0, 100.0)
_PROFILE_HARMONICS = 10  # the radius profile is smoothed to harmonics 0-10: pixel steps make no points
_TEMPLATE_RADIUS = 12.0


@dataclass(frozen=True)
class FrameReading:
    """One frame: is an object there, its color, its shape and where it is (None where not read)."""

    present: bool
    rgb: tuple[float, float, float] | None = None  # the object's core color
    color: str | None = None
    color_error: float = float("inf")  # RGB distance of the core to the nearest palette color
    shape: str | None = None
    shape_fit: float = 0.0  # soft IoU with the best-matching shape
    five_fold: float = 0.0  # the outline's 5-fold harmonic over its strongest other one (a star: > 1.2)
    points: int = 0  # prominent points of the outline (a star: 5, evenly enough spread)
    centroid: tuple[float, float] | None = None  # (x, y) in pixels


@dataclass(frozen=True)
class Reading:
    """What the clip shows as a whole: an attribute is set only when it holds in nearly every frame."""

    color: str | None
    shape: str | None
    direction: str | None
    background: str | None
    presence: float = 0.0  # share of frames with an object


@dataclass(frozen=True)
class ClipScore:
    expected: Caption
    observed: Reading
    frames: tuple[FrameReading, ...] = ()

    @property
    def color_ok(self) -> bool:
        return self.observed.color == self.expected.color

    @property
    def shape_ok(self) -> bool:
        return self.observed.shape == self.expected.shape

    @property
    def motion_ok(self) -> bool:
        return self.observed.direction == self.expected.direction

    @property
    def background_ok(self) -> bool:
        return self.observed.background == self.expected.background

    @property
    def present_ok(self) -> bool:
        """An object in every single frame."""
        return self.observed.presence == 1.0

    @property
    def all_ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.motion_ok and self.present_ok


def evaluate_clip(frames: np.ndarray, prompt: str) -> ClipScore:
    """Score frames (T, H, W, 3), uint8 or float in [0, 1], against a shapes-world prompt."""
    expected = parse_caption(prompt)
    background, per_frame = read_frames(frames)
    return ClipScore(expected=expected, observed=_summarise(background, per_frame), frames=tuple(per_frame))


def read_clip(frames: np.ndarray) -> Reading:
    """Color, shape, direction and background that hold across the clip (None where none holds)."""
    return _summarise(*read_frames(frames))


def read_frames(frames: np.ndarray) -> tuple[np.ndarray, list[FrameReading]]:
    """The clip's background color (RGB) and a reading of every frame."""
    video = _as_float_rgb(frames)
    background = np.median(_border_pixels(video), axis=0)
    return background, [_read_frame(frame, background) for frame in video]


def color_distance(frames: np.ndarray, color: str) -> float:
    """RGB distance between the object's color (median over the frames that show one) and a palette
    color: a continuous color score, lower is closer, blind to presence (`presence` measures that).
    The farthest distance when no frame shows an object."""
    _, per_frame = read_frames(frames)
    target = np.array(COLORS[color], dtype=np.float32)
    distances = [float(np.linalg.norm(np.array(f.rgb) - target)) for f in per_frame if f.rgb is not None]
    return float(np.median(distances)) if distances else float(np.linalg.norm([255.0, 255.0, 255.0]))


def accuracy(scores: list[ClipScore]) -> dict[str, float]:
    """Share of clips right per attribute; `present`: an object in every frame; `presence_rate`: share
    of all frames with an object; `all`: color, shape, motion and presence at once."""
    names = ("color", "shape", "motion", "background", "present", "all")
    if not scores:
        return {**{name: 0.0 for name in names}, "presence_rate": 0.0}
    n = len(scores)
    result = {name: sum(getattr(s, f"{name}_ok") for s in scores) / n for name in names}
    result["presence_rate"] = float(np.mean([s.observed.presence for s in scores]))
    return result


def accuracy_by(scores: list[ClipScore], group: str, attribute: str) -> dict[str, float]:
    """Share of clips right on `attribute` for each value of the prompt's `group` field (e.g. shape
    accuracy per shape): an average over a split can hide a combination that nearly always fails."""
    groups: dict[str, list[bool]] = {}
    for score in scores:
        groups.setdefault(getattr(score.expected, group), []).append(getattr(score, f"{attribute}_ok"))
    return {value: sum(oks) / len(oks) for value, oks in sorted(groups.items())}


# ---- one frame


def _read_frame(frame: np.ndarray, background: np.ndarray) -> FrameReading:
    core = _object_core(frame, background)
    if core is None:
        return FrameReading(present=False)
    alpha = _coverage(frame, background, core)
    name, error = _nearest_with_distance(core, COLORS)
    center = _centroid(alpha)
    shape, fit = _match_shape(alpha, center)
    radius = _radius_profile(alpha, *center)  # the outline, read twice below: its harmonics and its points
    five_fold = _five_fold(radius)
    gaps = _point_gaps(radius)
    if fit < _SHAPE_FIT:
        shape = "star" if five_fold >= _FIVE_FOLD_DOMINANCE or _five_even_points(gaps) else None
    return FrameReading(
        present=True,
        rgb=(float(core[0]), float(core[1]), float(core[2])),
        color=name if error <= _COLOR_TOLERANCE else None,
        color_error=error,
        shape=shape,
        shape_fit=fit,
        five_fold=five_fold,
        points=len(gaps),
        centroid=center,
    )


def _object_core(frame: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The object's color (median of its core, away from blended edges), or None when no object is there."""
    distance = np.linalg.norm(frame - background, axis=-1)
    strong = distance > _MIN_CONTRAST
    area = int(strong.sum())
    if not _MIN_AREA <= area <= _MAX_AREA_FRACTION * distance.size:
        return None
    core = distance > max(_MIN_CONTRAST, 0.7 * float(np.percentile(distance[strong], 90)))
    color = np.median(frame[core], axis=0)
    if np.linalg.norm(color - background) < _MIN_OBJECT_CONTRAST:
        return None
    return color


def _coverage(frame: np.ndarray, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Per-pixel object fraction: projection of each pixel on the background->object color line."""
    axis = foreground - background
    alpha = np.clip((frame - background) @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    alpha[alpha < _NOISE_ALPHA] = 0.0  # faint noise over the whole background would pull area and centroid
    return alpha


def _centroid(alpha: np.ndarray) -> tuple[float, float]:
    total = float(alpha.sum())
    ys, xs = np.indices(alpha.shape)
    return float((alpha * xs).sum() / total), float((alpha * ys).sum() / total)


def _match_shape(alpha: np.ndarray, center: tuple[float, float]) -> tuple[str | None, float]:
    """The world's shape that best overlaps the silhouette at the same area and centroid, and its soft IoU."""
    area = float(alpha.sum())
    cx, cy = center
    best, best_fit = None, 0.0
    for shape in SHAPES:
        unit_area, (offset_x, offset_y) = _shape_geometry(shape)
        radius = float(np.sqrt(area / unit_area))
        template = _shape_coverage(shape, cx - offset_x * radius, cy - offset_y * radius, radius, alpha.shape)
        fit = float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6))
        if fit > best_fit:
            best, best_fit = shape, fit
    return best, best_fit


def _five_fold(radius: np.ndarray) -> float:
    """How clearly the outline has five points: its radius profile's 5-fold harmonic divided by the
    strongest of harmonics 1-9 otherwise, 0 when that harmonic is too weak to be a point at all."""
    harmonics = np.abs(np.fft.rfft(radius))[1:10] * 2 / radius.size / max(float(radius.mean()), 1e-6)
    five, others = float(harmonics[4]), float(np.delete(harmonics, 4).max())
    return five / max(others, 1e-6) if five >= _FIVE_FOLD_MIN else 0.0


def _point_gaps(radius: np.ndarray) -> list[float]:
    """Angles (degrees) between neighbouring points of the outline (its radius profile). Points are the
    smoothed profile's peaks; the shallowest is dropped while it rises less than _POINT_DEPTH above a
    neighbouring notch, so a forked or bumpy tip counts once."""
    spectrum = np.fft.rfft(radius)
    spectrum[_PROFILE_HARMONICS + 1:] = 0
    smooth = np.fft.irfft(spectrum, n=radius.size)
    peaks = list(np.flatnonzero((smooth > np.roll(smooth, 1)) & (smooth >= np.roll(smooth, -1))))
    while len(peaks) > 1:
        depths = [smooth[peak] - max(_lowest_between(smooth, peaks[k - 1], peak),
                                     _lowest_between(smooth, peak, peaks[(k + 1) % len(peaks)]))
                  for k, peak in enumerate(peaks)]
        shallowest = int(np.argmin(depths))
        if depths[shallowest] >= _POINT_DEPTH * float(smooth.mean()):
            break
        peaks.pop(shallowest)
    step = 360.0 / radius.size
    return [float((after - before) % radius.size or radius.size) * step
            for before, after in zip(peaks, peaks[1:] + peaks[:1])] if peaks else []


def _lowest_between(profile: np.ndarray, start: int, end: int) -> float:
    """The profile's minimum going round from index start to index end (the whole circle when equal)."""
    length = (end - start) % profile.size or profile.size
    return float(profile[(start + np.arange(length + 1)) % profile.size].min())


def _five_even_points(gaps: list[float]) -> bool:
    return len(gaps) == 5 and _POINT_GAPS[0] <= min(gaps) and max(gaps) <= _POINT_GAPS[1]


def _radius_profile(alpha: np.ndarray, cx: float, cy: float, rays: int = 120, step: float = 0.25) -> np.ndarray:
    """The object's extent along rays from (cx, cy): its coverage summed along each ray (bilinear)."""
    angles = 2 * np.pi * np.arange(rays) / rays
    distances = np.arange(0.0, max(alpha.shape), step)
    xs = cx + distances[None] * np.cos(angles)[:, None]
    ys = cy + distances[None] * np.sin(angles)[:, None]
    padded = np.pad(alpha, 1)  # zero outside the frame
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return padded[np.clip(y + 1, 0, padded.shape[0] - 1), np.clip(x + 1, 0, padded.shape[1] - 1)]

    samples = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
               + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    return samples.sum(axis=1) * step


@lru_cache(maxsize=None)
def _shape_geometry(shape: str) -> tuple[float, tuple[float, float]]:
    """A shape's area per squared radius and its centroid's offset from the drawing centre per radius."""
    size = int(8 * _TEMPLATE_RADIUS)
    centre = size / 2
    coverage = _shape_coverage(shape, centre, centre, _TEMPLATE_RADIUS, (size, size))
    cx, cy = _centroid(coverage)
    return float(coverage.sum()) / _TEMPLATE_RADIUS**2, ((cx - centre) / _TEMPLATE_RADIUS, (cy - centre) / _TEMPLATE_RADIUS)


def _shape_coverage(shape: str, cx: float, cy: float, radius: float, size: tuple[int, int]) -> np.ndarray:
    """The world's own anti-aliased drawing of a shape (one frame, no motion)."""
    spec = world.ClipSpec(color="red", shape=shape, direction="right", background="black", radius=radius,
                          start_x=cx, start_y=cy, travel=0.0, width=size[1], height=size[0], num_frames=1)
    return world.render_coverage(spec)[0]


# ---- the clip


def _summarise(background: np.ndarray, frames: list[FrameReading]) -> Reading:
    present = [f for f in frames if f.present]
    return Reading(
        color=_holding([f.color for f in frames]),
        shape=_holding([f.shape for f in frames]),
        direction=_read_direction(frames),
        background=_nearest_with_distance(background, BACKGROUNDS)[0],
        presence=len(present) / max(len(frames), 1),
    )


def _holding(values: list[str | None]) -> str | None:
    """The value seen in nearly every frame, else None."""
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return None
    value, count = counts.most_common(1)[0]
    return value if count >= NEARLY_EVERY * len(values) else None


_DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def _read_direction(frames: list[FrameReading]) -> str | None:
    """The direction of the centroid's least-squares path, if the object is there in nearly every frame,
    travels far enough, and nearly every step goes that way."""
    points = [(t, f.centroid) for t, f in enumerate(frames) if f.centroid is not None]
    if len(points) < max(2, NEARLY_EVERY * len(frames)):
        return None
    t = np.array([p[0] for p in points], dtype=np.float64)
    xy = np.array([p[1] for p in points], dtype=np.float64)
    span = t.max() - t.min()
    travel = np.array([np.polyfit(t, xy[:, 0], 1)[0], np.polyfit(t, xy[:, 1], 1)[0]]) * span
    if np.abs(travel).max() < _MIN_TRAVEL:
        return None
    axis = int(np.argmax(np.abs(travel)))
    direction = {(0, True): "right", (0, False): "left", (1, True): "down", (1, False): "up"}[(axis, travel[axis] > 0)]
    along = np.diff(xy, axis=0) @ np.array(_DIRECTION_VECTORS[direction])
    steps_with = int((along >= -_BACKWARD_SLACK).sum())
    return direction if steps_with >= NEARLY_EVERY * len(along) else None


# ---- pixels


def _as_float_rgb(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32)
    return np.clip(frames.astype(np.float32), 0.0, 1.0) * 255.0


def _border_pixels(video: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [video[:, 0].reshape(-1, 3), video[:, -1].reshape(-1, 3), video[:, :, 0].reshape(-1, 3), video[:, :, -1].reshape(-1, 3)]
    )


def _nearest_with_distance(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    distances = [float(np.linalg.norm(rgb - np.array(palette[name], dtype=np.float32))) for name in names]
    best = int(np.argmin(distances))
    return names[best], distances[best]
