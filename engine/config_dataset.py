"""The dataset tables of the training config: `[dataset]` (or a dataset TOML), its `[[directory]]`
tables with per-directory overrides, and `[[eval_datasets]]`.

Shapes diffusion-pipe users write are taken as written: a resolution may be a side length or a
`[width, height]` pair (the same area), an aspect-ratio bucket a ratio or a `[width, height]` pair.
Every bucket setting of `[dataset]` may be overridden in one `[[directory]]`;
`engine.dataset.settings_for` merges them.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from engine.config_types import Bool, ConfigError, ConfigTable, Float, Int, Str

__all__ = ["DirectoryConfig", "DatasetConfig", "EvalDatasetConfig", "load_dataset_table", "dataset_errors",
           "resolve_directories"]

ShortVideos = Literal["skip", "still"]
# Fields added for diffusion-pipe's dataset options stay out of the Train tab's form (they are set in
# TOML); the form binds the fields it had before.
NOT_IN_FORM = {"form": False}


def _side_of(value: Any) -> Any:
    """A `[width, height]` resolution is the area it names: its side, rounded to a multiple of 16."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return max(16, int(round(math.sqrt(value[0] * value[1]) / 16)) * 16)
    return value


def _sides(values: Any) -> Any:
    return [_side_of(v) for v in values] if isinstance(values, list) else values


def _ratios(values: Any) -> Any:
    """Aspect-ratio buckets as width/height ratios (a `[width, height]` pair is its ratio)."""
    if not isinstance(values, list):
        return values
    return [v[0] / v[1] if isinstance(v, (list, tuple)) and len(v) == 2 and v[1] else v for v in values]


Resolutions = Annotated[list[Int], BeforeValidator(_sides)]
ArBuckets = Annotated[list[Float], BeforeValidator(_ratios)]


class DirectoryConfig(ConfigTable):
    path: Str = Field(description="Folder of images/videos (searched recursively) with their captions.")
    num_repeats: Int = Field(1, description="How many times each file is seen per epoch.")
    # Per-directory overrides of the [dataset] bucket settings (None: the dataset's value).
    resolutions: Resolutions | None = Field(None, description="Overrides dataset.resolutions.")
    enable_ar_bucket: Bool | None = Field(None, description="Overrides dataset.enable_ar_bucket.")
    min_ar: Float | None = Field(None, description="Overrides dataset.min_ar.")
    max_ar: Float | None = Field(None, description="Overrides dataset.max_ar.")
    num_ar_buckets: Int | None = Field(None, description="Overrides dataset.num_ar_buckets.")
    ar_buckets: ArBuckets | None = Field(None, description="Overrides dataset.ar_buckets.")
    frame_buckets: list[Int] | None = Field(None, description="Overrides dataset.frame_buckets.")
    short_videos: ShortVideos | None = Field(None, description="Overrides dataset.short_videos.")
    skip_empty_caption: Bool | None = Field(None, description="Overrides dataset.skip_empty_caption.")


def _one_table_is_a_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value  # `[dataset.directory]` written once


class DatasetConfig(ConfigTable):
    table_path = "dataset."

    resolutions: Resolutions = Field(
        [512], description="Training side lengths; each sample is resized to about side x side pixels (area).")
    enable_ar_bucket: Bool = Field(True, description="Group samples into aspect-ratio buckets.")
    min_ar: Float = Field(0.5, description="Smallest aspect ratio (width/height) bucket.")
    max_ar: Float = Field(2.0, description="Largest aspect ratio (width/height) bucket.")
    num_ar_buckets: Int = Field(7, description="Number of aspect-ratio buckets (log-spaced).")
    frame_buckets: list[Int] = Field([1, 33], description="Frame counts clips are cut to (each 4k+1; 1 = single image).")
    video_clip_mode: Literal["single_beginning", "single_middle"] = Field(
        "single_beginning", description="Where a clip is taken from a longer video.")
    ar_buckets: ArBuckets | None = Field(
        None, description="Aspect ratios (or [width, height] pairs) instead of min_ar/max_ar/num_ar_buckets.",
        json_schema_extra=NOT_IN_FORM)
    short_videos: ShortVideos | None = Field(
        None, description="A video shorter than every video frame bucket: 'skip' it (the default; named in a "
                          "warning) or train its first frame as a 'still' image.", json_schema_extra=NOT_IN_FORM)
    skip_empty_caption: Bool | None = Field(
        None, description="Skip files without a caption instead of training them with an empty one.",
        json_schema_extra=NOT_IN_FORM)
    directory: Annotated[list[DirectoryConfig], BeforeValidator(_one_table_is_a_list)] = Field(
        [], description="[[directory]] tables: path + num_repeats.")


class EvalDatasetConfig(ConfigTable):
    name: Str = Field(description="Name of the eval set (the eval loss curve's label).")
    dataset: DatasetConfig = Field(description="The eval set: a dataset TOML path (`config`) or an inline table.")


# ---- loading --------------------------------------------------------------------------------------


def load_dataset_table(value: Any, key: str, base: Path | None) -> tuple[Any, Path | None]:
    """A dataset given as a TOML path is read (relative to `base`): (the table, the folder its
    relative directory paths are relative to). An inline table is returned as it is."""
    if not isinstance(value, str):
        return value, base
    dataset_file = Path(value)
    if not dataset_file.is_absolute() and base is not None:
        dataset_file = base / dataset_file
    if not dataset_file.is_file():
        raise ConfigError(key, f"dataset file not found: {dataset_file}")
    try:
        return tomllib.loads(dataset_file.read_text(encoding="utf-8")), dataset_file.parent
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(key, f"{dataset_file}: invalid TOML: {exc}") from None


def resolve_directories(dataset: DatasetConfig, base: Path | None) -> None:
    """Make relative `[[directory]]` paths absolute against the folder of the file that named them."""
    if base is None:
        return
    for directory in dataset.directory:
        if not Path(directory.path).is_absolute():
            directory.path = str((base / directory.path).resolve())


# ---- value checks ---------------------------------------------------------------------------------


# Upper bounds far above any real run, so a typo (10**20) is refused with its key, not trained on.
MAX_REPEATS = 10_000
MAX_RESOLUTION = 4096
MAX_FRAMES = 1025


def dataset_errors(d: DatasetConfig, prefix: str = "dataset") -> list[tuple[str, str]]:
    """(key path, reason) for every bad value of a dataset table, its directories included."""
    errors = _bucket_errors(d, prefix)
    if not d.directory:
        errors.append((f"{prefix}.directory", "add at least one [[directory]] with a path"))
    for i, directory in enumerate(d.directory):
        where = f"{prefix}.directory[{i}]"
        if not directory.path.strip():
            errors.append((f"{where}.path", "must not be empty"))
        if directory.num_repeats < 1:
            errors.append((f"{where}.num_repeats", "must be >= 1"))
        elif directory.num_repeats > MAX_REPEATS:
            errors.append((f"{where}.num_repeats", f"must be <= {MAX_REPEATS}"))
        errors += _bucket_errors(directory, where)
    return errors


def _bucket_errors(d: DatasetConfig | DirectoryConfig, prefix: str) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if d.resolutions is not None:
        if not d.resolutions:
            errors.append((f"{prefix}.resolutions", "must list at least one resolution"))
        for i, r in enumerate(d.resolutions):
            if r < 16 or r % 16:
                errors.append((f"{prefix}.resolutions[{i}]", f"{r} must be a multiple of 16 and >= 16"))
            elif r > MAX_RESOLUTION:
                errors.append((f"{prefix}.resolutions[{i}]", f"{r} must be <= {MAX_RESOLUTION}"))
    if d.frame_buckets is not None:
        if not d.frame_buckets:
            errors.append((f"{prefix}.frame_buckets", "must list at least one frame count"))
        for i, f in enumerate(d.frame_buckets):
            if f < 1 or (f - 1) % 4:
                errors.append((f"{prefix}.frame_buckets[{i}]", f"{f} is not 4k+1 (1, 5, 9, ..., 33, 81)"))
            elif f > MAX_FRAMES:
                errors.append((f"{prefix}.frame_buckets[{i}]", f"{f} must be <= {MAX_FRAMES}"))
    if d.min_ar is not None and d.max_ar is not None and not 0 < d.min_ar <= d.max_ar:
        errors.append((f"{prefix}.min_ar", "need 0 < min_ar <= max_ar"))
    if d.num_ar_buckets is not None and d.num_ar_buckets < 1:
        errors.append((f"{prefix}.num_ar_buckets", "must be >= 1"))
    if d.ar_buckets is not None and not all(r > 0 for r in d.ar_buckets):
        errors.append((f"{prefix}.ar_buckets", "every aspect ratio must be > 0"))
    return errors
