"""A generation request: typed, validated before any model work, and serialisable to JSON.

`InferRequest.validate()` checks every field against the limits below and raises one
`engine.config.ConfigError` naming each bad field (`width: must be a multiple of 16, got 500`).
`resolve_lora_path` turns "a file", "a LoRA folder" or "a run directory's epochN folder" into the
safetensors file the worker loads.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.config import ConfigError
from engine.rundir import LORA_FILE, RunDir

__all__ = ["LoraSpec", "InferRequest", "LIMITS", "request_defaults", "resolve_lora_path", "random_seed"]

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


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a stack: a .safetensors file, a LoRA folder or a run's `epochN` folder, and its weight."""

    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """'FILE' or 'FILE:0.8' (the CLI form); the weight is after the last colon."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(path=head, weight=float(tail))
            except ValueError:
                pass  # a colon inside the path, no weight
        return cls(path=text, weight=1.0)


@dataclass
class InferRequest:
    model: str = "demo"
    prompt: str = ""
    negative_prompt: str = ""
    loras: list[LoraSpec] = field(default_factory=list)
    width: int = 832
    height: int = 480
    num_frames: int = 81
    steps: int = 30
    guidance_scale: float = 5.0
    flow_shift: float | None = None  # None: the model's own (its scheduler config), recorded at submit
    seed: int | None = None
    fps: int = 16
    num_videos: int = 1
    fuse_loras: bool = False

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, spatial_multiple: int = SPATIAL_MULTIPLE, temporal_stride: int = TEMPORAL_STRIDE) -> "InferRequest":
        """Raise ConfigError naming every out-of-range field; returns self when all is well."""
        errors: list[tuple[str, str]] = []
        if not str(self.model).strip():
            errors.append(("model", "must name a model ('demo' or a local diffusers folder)"))
        if not self.prompt.strip():
            errors.append(("prompt", "must not be empty"))
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                errors.append((name, f"must be at most {MAX_PROMPT_CHARS} characters"))
        for name in ("width", "height", "num_frames", "steps", "fps", "num_videos"):
            errors += _check_int(name, getattr(self, name))
        errors += _check_float("guidance_scale", self.guidance_scale)
        if self.flow_shift is not None:
            errors += _check_float("flow_shift", self.flow_shift)
        for name in ("width", "height"):
            value = getattr(self, name)
            if _is_int(value) and value % spatial_multiple:
                lower = max(spatial_multiple, value // spatial_multiple * spatial_multiple)
                errors.append((name, f"must be a multiple of {spatial_multiple}, got {value} (try {lower})"))
        if _is_int(self.num_frames) and (self.num_frames - 1) % temporal_stride:
            k = max(0, round((self.num_frames - 1) / temporal_stride))
            errors.append(("num_frames", f"must be {temporal_stride}k+1 (1, 5, 9, ... 81), got {self.num_frames} "
                                         f"(try {temporal_stride * k + 1})"))
        if self.seed is not None:
            errors += _check_int("seed", self.seed)
        if not isinstance(self.fuse_loras, bool):
            errors.append(("fuse_loras", "must be true or false"))
        errors += self._lora_errors()
        if errors:
            raise ConfigError(errors)
        return self

    def _lora_errors(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if len(self.loras) > MAX_LORAS:
            errors.append(("loras", f"at most {MAX_LORAS} LoRAs per request, got {len(self.loras)}"))
        low, high = LIMITS["lora_weight"]
        seen: set[str] = set()
        for i, spec in enumerate(self.loras):
            if not isinstance(spec, LoraSpec):
                errors.append((f"loras[{i}]", "must be a LoraSpec(path, weight)"))
                continue
            if not str(spec.path).strip():
                errors.append((f"loras[{i}].path", "must not be empty"))
            elif str(spec.path) in seen:
                errors.append((f"loras[{i}].path", f"{spec.path} is listed twice; give it one weight"))
            seen.add(str(spec.path))
            if not _is_number(spec.weight) or not (low <= spec.weight <= high):
                errors.append((f"loras[{i}].weight", f"must be a number in [{low:g}, {high:g}], got {spec.weight!r}"))
        return errors

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [{"path": s.path, "weight": s.weight} for s in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InferRequest":
        """From UI/API/CLI values; a size or sampling field left out or None takes the model's default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([(name, "unknown field") for name in unknown])
        values = {**request_defaults(str(data.get("model") or cls.model)),
                  **{k: v for k, v in data.items() if not (k in MODEL_DEFAULT_FIELDS and v is None)}}
        for name in _INT_FIELDS:  # widgets hand numbers over as floats (42.0): keep whole ones
            value = values.get(name)
            if isinstance(value, float) and value.is_integer():
                values[name] = int(value)
        values["loras"] = [
            spec if isinstance(spec, LoraSpec) else
            LoraSpec(path=str(spec["path"]), weight=spec.get("weight", 1.0)) if isinstance(spec, dict) else
            LoraSpec(path=str(spec[0]), weight=spec[1])
            for spec in values.get("loras", [])
        ]
        return cls(**values)

    def with_seed(self) -> "InferRequest":
        """A copy whose seed is set (random when empty), so the result is reproducible."""
        return self if self.seed is not None else replace(self, seed=random_seed())


# One table of defaults for the UI, the HTTP API and the CLI. The demo model was trained on 64x64x17
# clips; the class defaults are Wan's 480p81. flow_shift is not here: None means the model's own
# (its scheduler config), everywhere.
MODEL_DEFAULT_FIELDS = ("width", "height", "num_frames", "steps", "guidance_scale", "fps")
_DEMO_DEFAULTS = {"width": 64, "height": 64, "num_frames": 17, "steps": 20}


def request_defaults(model: str) -> dict[str, Any]:
    base = InferRequest()
    values = {name: getattr(base, name) for name in MODEL_DEFAULT_FIELDS}
    if model.strip() == "demo":
        values.update(_DEMO_DEFAULTS)
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
        preferred = [p for p in direct if p.name == LORA_FILE]
        if len(preferred) == 1 or len(direct) == 1:
            return (preferred or direct)[0].resolve()
        raise FileNotFoundError(f"{path}: folder holds several .safetensors files; name one")
    newest = RunDir(path).newest_lora()  # a run directory: its latest save
    if newest is not None:
        return newest.file.resolve()
    raise FileNotFoundError(f"{path}: no .safetensors LoRA in this folder (nor in epochN/stepN subfolders)")


_INT_FIELDS = ("width", "height", "num_frames", "steps", "seed", "fps", "num_videos")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any) -> list[tuple[str, str]]:
    low, high = LIMITS[name]
    if not _is_int(value):
        return [(name, f"must be a whole number, got {value!r}")]
    if not low <= value <= high:
        return [(name, f"must be in [{int(low)}, {int(high)}], got {value}")]
    return []


def _check_float(name: str, value: Any) -> list[tuple[str, str]]:
    low, high = LIMITS[name]
    if not _is_number(value):
        return [(name, f"must be a number, got {value!r}")]
    if not low <= value <= high:
        return [(name, f"must be in [{low:g}, {high:g}], got {value:g}")]
    return []
