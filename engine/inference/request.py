"""A generation request: typed, validated before any model work, and serialisable to JSON.

`InferRequest` is a pydantic model: building one checks each field's type and range and raises one
`engine.config.ConfigError` naming every bad field (`steps: must be in [1, 200], got 0`).
`validate()` adds the checks that depend on the model family (width a multiple of 16, frames 4k+1)
and across fields (a LoRA listed twice). `resolve_lora_path` turns "a file", "a LoRA folder" or
"a run directory's epochN folder" into the safetensors file the worker loads.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, PlainValidator, field_validator
from pydantic_core import PydanticCustomError

from engine.config import ConfigError
from engine.config_types import ConfigTable
from engine.numbers import whole_number
from engine.rundir import EXPERT_LORA_FILES, LORA_FILE, RunDir

__all__ = ["LoraSpec", "InferRequest", "LIMITS", "DEMO_DEFAULTS", "request_defaults", "resolve_lora_path", "random_seed"]

# Inclusive (low, high) bounds per numeric field; the UI reads these for its sliders.
LIMITS: dict[str, tuple[float, float]] = {
    "width": (16, 2048),
    "height": (16, 2048),
    "num_frames": (1, 257),
    "steps": (1, 200),
    "guidance_scale": (0.0, 30.0),
    "flow_shift": (0.1, 20.0),
    "fps": (1, 60),
    "num_videos": (1, 16),
    "lora_weight": (-4.0, 4.0),
    "seed": (0, 2**63 - 1),
}
MAX_LORAS = 8
MAX_PROMPT_CHARS = 4000
SPATIAL_MULTIPLE = 16  # Wan: VAE stride 8 x transformer patch 2
TEMPORAL_STRIDE = 4  # Wan: frames = 4k + 1
LORA_SUFFIX = ".safetensors"


def random_seed() -> int:
    """A fresh seed for a request that left it empty (always recorded with the result)."""
    return secrets.randbelow(2**31)


# ---- field types: strict (a string seed is refused, not compared), bounded by LIMITS ---------------

def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("request_value", message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(limit: str) -> Any:
    low, high = LIMITS[limit]

    def check(value: Any) -> int:
        if isinstance(value, str):  # a request's numbers are numbers, not text to parse
            raise _refuse(f"must be a whole number, got {value!r}")
        try:
            return whole_number(value, int(low), int(high))
        except ValueError as exc:
            raise _refuse(str(exc)) from None

    return Annotated[int, PlainValidator(check)]


def _number(limit: str, template: str = "must be a number, got {value!r}") -> Any:
    low, high = LIMITS[limit]

    def check(value: Any) -> float:
        if not _is_number(value):
            raise _refuse(template.format(value=value))
        if not low <= value <= high:
            raise _refuse(f"must be in [{low:g}, {high:g}], got {value:g}")
        return float(value)

    return Annotated[float, PlainValidator(check)]


def _text() -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _refuse(f"must be text, got {value!r}")
        if len(value) > MAX_PROMPT_CHARS:
            raise _refuse(f"must be at most {MAX_PROMPT_CHARS} characters")
        return value

    return Annotated[str, PlainValidator(check)]


def _path_text(value: Any) -> str:
    if not isinstance(value, (str, Path)):
        raise _refuse(f"must be a file or folder path, got {value!r}")
    return str(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse("must be true or false")
    return value


class LoraSpec(ConfigTable):
    """One LoRA of a stack: a .safetensors file, a LoRA folder or a run's `epochN` folder, and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, PlainValidator(_path_text)]
    weight: _number("lora_weight", "must be a number in [-4, 4], got {value!r}") = 1.0

    # Positional (path, weight) for callers; pydantic calls this for nested specs too, and a
    # ConfigError raised here keeps its key path under `loras[i]` (engine.config_types).
    def __init__(self, path: Any = None, weight: Any = 1.0, **values: Any):
        super().__init__(path=path if path is not None else values.pop("path", ""), weight=weight, **values)

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """'FILE' or 'FILE:0.8' (the CLI form); the weight is after the last colon."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                pass  # a colon inside the path, no weight
            else:
                return cls(path=head, weight=weight)  # an out-of-range weight is refused, not read as a path
        return cls(path=text, weight=1.0)


class InferRequest(ConfigTable):
    model: _text() = "demo"
    prompt: _text() = ""
    negative_prompt: _text() = ""
    loras: list[LoraSpec] = []
    width: _whole("width") = 832
    height: _whole("height") = 480
    num_frames: _whole("num_frames") = 81
    steps: _whole("steps") = 30
    guidance_scale: _number("guidance_scale") = 5.0
    flow_shift: _number("flow_shift") | None = None  # None: the model's own (scheduler config), recorded at submit
    seed: _whole("seed") | None = None
    fps: _whole("fps") = 16
    num_videos: _whole("num_videos") = 1
    fuse_loras: Annotated[bool, PlainValidator(_flag)] = False
    compare_id: _text() | None = None  # the comparison (studio.compare) this video is a cell of; kept in the gallery
    image: _text() | None = None  # start image (an image file) of image-to-video models (Wan I2V, TI2V-5B)

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_pairs(cls, value: Any) -> Any:
        """The CLI and old records give (path, weight) pairs; a LoraSpec or a dict is taken as is."""
        if not isinstance(value, (list, tuple)):
            raise _refuse(f"must be a list of LoRAs, got {value!r}")
        if len(value) > MAX_LORAS:
            raise _refuse(f"at most {MAX_LORAS} LoRAs per request, got {len(value)}")
        return [{"path": spec[0], "weight": spec[1]} if isinstance(spec, (list, tuple)) and len(spec) == 2 else spec
                for spec in value]

    # ---- checks that need the model family or several fields -----------------------------------
    def validate(self, spatial_multiple: int = SPATIAL_MULTIPLE, temporal_stride: int = TEMPORAL_STRIDE) -> "InferRequest":
        """Raise ConfigError naming every field the model cannot take; returns self when all is well."""
        errors: list[tuple[str, str]] = []
        if not self.model.strip():
            errors.append(("model", "must name a model ('demo' or a local diffusers folder)"))
        if not self.prompt.strip():
            errors.append(("prompt", "must not be empty"))
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % spatial_multiple:
                lower = max(spatial_multiple, value // spatial_multiple * spatial_multiple)
                errors.append((name, f"must be a multiple of {spatial_multiple}, got {value} (try {lower})"))
        if (self.num_frames - 1) % temporal_stride:
            k = max(0, round((self.num_frames - 1) / temporal_stride))
            errors.append(("num_frames", f"must be {temporal_stride}k+1 (1, 5, 9, ... 81), got {self.num_frames} "
                                         f"(try {temporal_stride * k + 1})"))
        if self.image is not None and not Path(self.image).expanduser().is_file():
            errors.append(("image", f"start image {self.image} not found (give an image file)"))
        seen: set[str] = set()
        for i, spec in enumerate(self.loras):
            if not spec.path.strip():
                errors.append((f"loras[{i}].path", "must not be empty"))
            elif spec.path in seen:
                errors.append((f"loras[{i}].path", f"{spec.path} is listed twice; give it one weight"))
            seen.add(spec.path)
        if errors:
            raise ConfigError(errors)
        return self

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InferRequest":
        """From UI/API/CLI values; a size or sampling field left out or None takes the model's default."""
        model = data.get("model")
        defaults = request_defaults(model if isinstance(model, str) and model else cls.model_fields["model"].default)
        return cls(**{**defaults, **{k: v for k, v in data.items() if not (k in MODEL_DEFAULT_FIELDS and v is None)}})

    def with_seed(self) -> "InferRequest":
        """A copy whose seed is set (random when empty), so the result is reproducible."""
        return self if self.seed is not None else self.model_copy(update={"seed": random_seed()})


# One table of defaults for the UI, the HTTP API and the CLI. The demo model was trained on 64x64x17
# clips; the class defaults are Wan's 480p81. flow_shift is not here: None means the model's own
# (its scheduler config), everywhere.
MODEL_DEFAULT_FIELDS = ("width", "height", "num_frames", "steps", "guidance_scale", "fps")
# The demo's own settings, also `studio demo --generate`'s and the demo benches' (engine.demo.sampling).
# Guidance 3 reads the demo's shapes better than Wan's 5 at the same color and motion (docs/demo.md).
DEMO_DEFAULTS = {"width": 64, "height": 64, "num_frames": 17, "steps": 20, "guidance_scale": 3.0}


def request_defaults(model: str) -> dict[str, Any]:
    base = InferRequest()
    values = {name: getattr(base, name) for name in MODEL_DEFAULT_FIELDS}
    if model.strip() == "demo":
        values.update(DEMO_DEFAULTS)
    return values


def resolve_lora_path(path: str | Path) -> Path:
    """The safetensors file behind a LoRA reference. Raises FileNotFoundError with the reason.

    Accepts a `.safetensors` file, a folder holding one (`epoch3/adapter_model.safetensors`), or a run
    directory (its newest `epochN`/`stepN` save).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: LoRA file or folder not found")
    direct = sorted(path.glob("*" + LORA_SUFFIX))
    if direct:
        preferred = [p for p in direct if p.name in (LORA_FILE, EXPERT_LORA_FILES["high_noise"])]
        if len(preferred) == 1 or len(direct) == 1:
            return (preferred or direct)[0].resolve()
        raise FileNotFoundError(f"{path}: folder holds several .safetensors files; name one")
    newest = RunDir(path).newest_lora()  # a run directory: its latest save
    if newest is not None:
        return newest.file.resolve()
    raise FileNotFoundError(f"{path}: no .safetensors LoRA in this folder (nor in epochN/stepN subfolders)")


