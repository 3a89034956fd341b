"""Video files, in one place: probe, read frames, write browser-playable H.264 mp4.

Everything goes through imageio v3 with its "FFMPEG" plugin (backed by imageio-ffmpeg, a
requirement); PyAV is not installed, so the "pyav" plugin is not used. GIFs are decoded by PIL, as
the trainer always has, so their pixels do not change. Every decoder failure becomes a one-line
`MediaError` naming the file and ffmpeg's reason, never ffmpeg's banner.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MediaError", "VideoInfo", "probe_video", "read_video", "write_video", "error_reason", "display_scale",
           "upscale_nearest", "contact_sheet"]

DISPLAY_MIN_SIDE = 256  # pixels: smaller videos are shown enlarged (the demo's 64x64 becomes 256x256)

PLUGIN = "FFMPEG"
_FFMPEG_LINE = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*")  # ffmpeg's own messages: "[mov,mp4 @ 0x55..] text"


class MediaError(ValueError):
    """A file that cannot be read as a video; `reason` is the cause without the file name."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str  # "h264", "gif", ...
    pix_fmt: str  # "yuv420p" (ffmpeg's "(progressive)"/"(tv, bt709)" detail dropped)


def probe_video(path: str | Path, *, exact_frames: bool = True) -> VideoInfo:
    """Frame count, size, fps, codec and pixel format. exact_frames=False estimates the count from
    the container's duration x fps (no decode; may be off by one) for quick listings."""
    path = Path(path)
    if _is_gif(path):
        return _probe_gif(path)
    import imageio.v3 as iio

    with _reading(path):
        meta = iio.immeta(path, plugin=PLUGIN)
        if exact_frames:
            # The plugin reports nframes=inf (it never counts on open); its own count_frames() is
            # this imageio-ffmpeg call, which improps/immeta cannot reach.
            import imageio_ffmpeg

            frames = int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
        else:
            frames = int(round(meta.get("duration", 0) * meta.get("fps", 0)))
    width, height = meta["size"]
    if frames < 1 or width < 1 or height < 1:
        raise MediaError(path, "video has no frames")
    return VideoInfo(frames, int(width), int(height), float(meta.get("fps") or 0.0), str(meta.get("codec", "")),
                     str(meta.get("pix_fmt", "")).split("(")[0])


def read_video(path: str | Path, start: int = 0, count: int | None = None) -> np.ndarray:
    """uint8 RGB frames (F, H, W, 3): all of them, or `count` frames from index `start`.
    A window the file cannot fill is a MediaError ("decoded n frames, expected count")."""
    path = Path(path)
    if start < 0 or (count is not None and count < 1):
        raise ValueError(f"bad frame window start={start} count={count}")
    stop = None if count is None else start + count
    if _is_gif(path):
        frames = _read_gif(path, start, stop)
    else:
        import imageio.v3 as iio

        # Decode in order and slice: imread(index=i) would seek by timestamp (i / fps), which lands on
        # the wrong frame in variable-frame-rate files. closing() stops ffmpeg once the window is read.
        with _reading(path), contextlib.closing(iio.imiter(path, plugin=PLUGIN)) as stream:
            frames = [np.asarray(frame) for frame in itertools.islice(stream, start, stop)]
    if count is not None and len(frames) < count:
        where = f" from frame {start}" if start else ""
        raise MediaError(path, f"decoded {len(frames)} frames, expected {count}{where}")
    if not frames:
        raise MediaError(path, "video has no frames")
    return np.stack(frames)


def write_video(frames: np.ndarray, path: str | Path, fps: int, *, crf: int, preset: str = "medium",
                threads: int | None = None, faststart: bool = True) -> Path:
    """Encode uint8 frames (F, H, W, 3) as H.264/yuv420p in an mp4 container, atomically (temporary
    name, then rename), so a crash never leaves a half-written video. `threads` pins x264's thread
    count (reproducible bytes); `faststart` puts the index first so browsers stream it."""
    import imageio.v3 as iio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be (F, H, W, 3) with even H and W for yuv420p, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.mp4")  # ffmpeg picks the muxer from this suffix
    params = ["-crf", str(crf), "-preset", preset]
    if threads:
        params += ["-threads", str(threads)]
    if faststart:
        params += ["-movflags", "+faststart"]
    try:
        # macro_block_size=1: sizes are even (checked above), so ffmpeg never rescales behind our back.
        iio.imwrite(tmp, frames, plugin=PLUGIN, fps=fps, codec="libx264", pixelformat="yuv420p", quality=None,
                    bitrate=None, macro_block_size=1, ffmpeg_log_level="error", output_params=params)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def display_scale(width: int, height: int, min_side: int = DISPLAY_MIN_SIDE) -> int:
    """The whole factor that brings the shorter side to at least `min_side` (1 for videos that big already)."""
    return max(1, -(-min_side // max(1, min(width, height))))


def upscale_nearest(frames: np.ndarray, factor: int) -> np.ndarray:
    """Frames (..., H, W, C) enlarged `factor` times by repeating pixels: a browser's smooth scaling of
    a 64x64 clip turns shapes into blurs, repeated pixels keep their edges crisp."""
    if factor <= 1:
        return frames
    return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def contact_sheet(clips: list[np.ndarray], every: int = 1, factor: int = 2, gap: int = 2) -> np.ndarray:
    """One image of clips (F, H, W, 3) uint8, a row each, every `every`-th frame, enlarged `factor` times
    with nearest-neighbour, white gaps between frames and rows (to look at generated clips by eye)."""
    rows = []
    for clip in clips:
        frames = [upscale_nearest(frame, factor) for frame in clip[::every]]
        spacer = np.full((frames[0].shape[0], gap, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([part for frame in frames for part in (frame, spacer)][:-1], axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, gap), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return np.concatenate(rows, axis=0)[:-gap]


def error_reason(exc: BaseException) -> str:
    """One line for a log or a skip list: a MediaError's reason, else the first line of the message."""
    if isinstance(exc, MediaError):
        return exc.reason
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ---- internals ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except MediaError:
        raise
    except Exception as exc:  # imageio/ffmpeg raise OSError, RuntimeError, ... with the banner inside
        raise MediaError(path, f"cannot read video: {_ffmpeg_cause(exc)}") from exc


def _ffmpeg_cause(exc: Exception) -> str:
    """ffmpeg's last message (the verdict) and the one before it (usually the specific cause):
    'Invalid data found when processing input (moov atom not found)'."""
    lines = [line.strip() for line in str(exc).splitlines()]
    messages = [_FFMPEG_LINE.sub("", line) for line in lines if _FFMPEG_LINE.match(line)]
    if not messages:
        return error_reason(exc)
    verdict = messages[-1].split(": ", 1)[-1] if messages[-1].startswith("Error") else messages[-1]
    detail = messages[-2] if len(messages) > 1 and not messages[-2].startswith("Error") else ""
    return f"{verdict} ({detail})"[:200] if detail else verdict[:200]


def _is_gif(path: Path) -> bool:
    return path.suffix.lower() == ".gif"


def _probe_gif(path: Path) -> VideoInfo:
    from PIL import Image

    with _reading(path), Image.open(path) as img:
        duration_ms = img.info.get("duration") or 0
        return VideoInfo(max(1, getattr(img, "n_frames", 1)), img.width, img.height,
                         1000.0 / duration_ms if duration_ms else 0.0, "gif", img.mode)


def _read_gif(path: Path, start: int, stop: int | None) -> list[np.ndarray]:
    from PIL import Image

    frames = []
    with _reading(path), Image.open(path) as img:
        for index in range(start, stop if stop is not None else getattr(img, "n_frames", 1)):
            try:
                img.seek(index)
            except EOFError:
                break
            frames.append(np.asarray(img.convert("RGB")))
    return frames
