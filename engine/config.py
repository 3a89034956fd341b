"""Typed training configuration in the diffusion-pipe TOML shape.

One main file (`output_dir`, `epochs`, `[model]`, `[adapter]`, `[optimizer]`, ...) plus a dataset
file named by `dataset = "dataset.toml"` or an inline `[dataset]` table. Every field is a typed
dataclass field; parsing rejects unknown keys with a suggestion and wrong types with the key path;
`validate()` checks values and raises one `ConfigError` naming every bad key path.

The UI binds widgets through `config_fields()` and `TrainConfig.get(path)` / `with_value(path, v)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

__all__ = [
    "ConfigError",
    "DirectoryConfig",
    "DatasetConfig",
    "ModelConfig",
    "AdapterConfig",
    "OptimizerConfig",
    "PerformanceConfig",
    "TrainConfig",
    "FieldSpec",
    "config_fields",
    "DEFAULT_LORA_TARGETS",
]


class ConfigError(ValueError):
    """A bad configuration. `errors` holds (key_path, reason) pairs; str() names them all."""

    def __init__(self, errors: list[tuple[str, str]] | str, reason: str | None = None):
        if isinstance(errors, str):
            errors = [(errors, reason or "invalid value")]
        self.errors = list(errors)
        super().__init__("; ".join(f"{path}: {why}" if path else why for path, why in self.errors))

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.errors]


def _meta(help: str, choices: tuple | None = None, **extra: Any) -> dict[str, Any]:
    return {"help": help, "choices": choices, **extra}


# Linears inside each Wan block that LoRA targets by default: self/cross attention and the FFN.
# diffusers' Wan LoRA loader accepts exactly these (plus time/head projections).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

LrScheduler = Literal["constant", "linear", "cosine"]
TimestepMethod = Literal["logit_normal", "uniform"]
DType = Literal["bfloat16", "float16", "float32"]


@dataclass
class DirectoryConfig:
    path: str = field(metadata=_meta("Folder of images/videos with same-name .txt captions."))
    num_repeats: int = field(default=1, metadata=_meta("How many times each file is seen per epoch."))


@dataclass
class DatasetConfig:
    resolutions: list[int] = field(
        default_factory=lambda: [512],
        metadata=_meta("Training side lengths; each sample is resized to about side x side pixels (area)."),
    )
    enable_ar_bucket: bool = field(default=True, metadata=_meta("Group samples into aspect-ratio buckets."))
    min_ar: float = field(default=0.5, metadata=_meta("Smallest aspect ratio (width/height) bucket."))
    max_ar: float = field(default=2.0, metadata=_meta("Largest aspect ratio (width/height) bucket."))
    num_ar_buckets: int = field(default=7, metadata=_meta("Number of aspect-ratio buckets (log-spaced)."))
    frame_buckets: list[int] = field(
        default_factory=lambda: [1, 33],
        metadata=_meta("Frame counts clips are cut to (each 4k+1; 1 = single image)."),
    )
    video_clip_mode: Literal["single_beginning", "single_middle"] = field(
        default="single_beginning",
        metadata=_meta("Where a clip is taken from a longer video.", ("single_beginning", "single_middle")),
    )
    directory: list[DirectoryConfig] = field(
        default_factory=list, metadata=_meta("[[directory]] tables: path + num_repeats.")
    )


@dataclass
class ModelConfig:
    type: Literal["wan"] = field(default="wan", metadata=_meta("Model family.", ("wan",)))
    ckpt_path: str = field(
        default="demo",
        metadata=_meta("'demo' or a local diffusers folder (with model_index.json)."),
    )
    transformer_subfolder: str = field(
        default="transformer",
        metadata=_meta(
            "Transformer to train. Wan2.2 A14B: 'transformer' = high-noise expert, "
            "'transformer_2' = low-noise expert (set min_t/max_t to its range)."
        ),
    )
    dtype: DType = field(
        default="bfloat16",
        metadata=_meta("Dtype of the frozen model on GPU (CPU always uses float32).", ("bfloat16", "float16", "float32")),
    )
    transformer_dtype: DType | None = field(
        default=None, metadata=_meta("Transformer dtype on GPU; default = dtype.", ("bfloat16", "float16", "float32"))
    )
    timestep_sample_method: TimestepMethod = field(
        default="logit_normal",
        metadata=_meta("How training noise levels are drawn.", ("logit_normal", "uniform")),
    )
    shift: float = field(default=1.0, metadata=_meta("Flow shift applied to sampled t (1 = none, >1 = noisier)."))
    min_t: float = field(default=0.0, metadata=_meta("Lowest noise level trained (0..1)."))
    max_t: float = field(default=1.0, metadata=_meta("Highest noise level trained (0..1)."))


@dataclass
class AdapterConfig:
    type: Literal["lora"] = field(default="lora", metadata=_meta("Adapter type.", ("lora",)))
    rank: int = field(default=32, metadata=_meta("LoRA rank."))
    alpha: int | None = field(default=None, metadata=_meta("LoRA alpha; default = rank (scale 1)."))
    dropout: float = field(default=0.0, metadata=_meta("LoRA dropout probability."))
    dtype: DType = field(
        default="float32",
        metadata=_meta("Dtype of the trained LoRA weights on GPU.", ("bfloat16", "float16", "float32")),
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata=_meta("Linear layers (name suffixes inside each block) that get LoRA."),
    )
    init_from_existing: str | None = field(
        default=None, metadata=_meta("LoRA folder or .safetensors file to start from.")
    )


@dataclass
class OptimizerConfig:
    type: Literal["adamw", "adamw_optimi", "AdamW"] = field(
        default="adamw", metadata=_meta("Optimizer (torch AdamW).", ("adamw", "adamw_optimi", "AdamW"))
    )
    lr: float = field(default=2e-5, metadata=_meta("Peak learning rate."))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99], metadata=_meta("Adam betas."))
    weight_decay: float = field(default=0.01, metadata=_meta("Decoupled weight decay."))
    eps: float = field(default=1e-8, metadata=_meta("Adam epsilon."))


@dataclass
class PerformanceConfig:
    """Speed options (engine/families/wan_perf.py); the defaults change nothing."""

    attention_backend: Literal["default", "cudnn", "flash", "efficient", "flash3"] = field(
        default="default",
        metadata=_meta("Attention kernel tried first; 'default' keeps PyTorch's choice (cuDNN on Hopper); "
                       "'flash3' is FlashAttention-3 (Hopper, installed separately).",
                       ("default", "cudnn", "flash", "efficient", "flash3")),
    )
    compile_blocks: bool = field(
        default=False, metadata=_meta("torch.compile each transformer block (GPU; first step ~30 s slower).")
    )
    checkpointing: Literal["full", "save_attention"] = field(
        default="full",
        metadata=_meta("With activation checkpointing: recompute whole blocks, or keep self-attention outputs "
                       "(faster, a little more memory).", ("full", "save_attention")),
    )
    lora_compute_dtype: Literal["adapter", "activation"] = field(
        default="adapter",
        metadata=_meta("LoRA matmuls in adapter.dtype, or in the model dtype (bf16) with fp32 weights kept.",
                       ("adapter", "activation")),
    )


@dataclass
class TrainConfig:
    output_dir: str = field(metadata=_meta("Where run directories are created (output_dir/<timestamp>)."))
    dataset: DatasetConfig = field(
        default_factory=DatasetConfig, metadata=_meta("Dataset: a path to a dataset TOML, or an inline table.")
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_meta("[model] table."))
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata=_meta("[adapter] table."))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata=_meta("[optimizer] table."))
    performance: PerformanceConfig = field(
        default_factory=PerformanceConfig, metadata=_meta("[performance] table: GPU speed options.")
    )
    epochs: int = field(default=10, metadata=_meta("Passes over the dataset."))
    max_steps: int | None = field(default=None, metadata=_meta("Stop after this many optimizer steps (optional)."))
    micro_batch_size_per_gpu: int = field(default=1, metadata=_meta("Samples per rank per forward."))
    gradient_accumulation_steps: int = field(default=1, metadata=_meta("Micro-batches per optimizer step."))
    gradient_clipping: float = field(default=1.0, metadata=_meta("Max gradient norm (0 = off)."))
    warmup_steps: int = field(default=0, metadata=_meta("Linear lr warmup steps."))
    lr_scheduler: LrScheduler = field(
        default="constant", metadata=_meta("Schedule after warmup.", ("constant", "linear", "cosine"))
    )
    save_every_n_epochs: int | None = field(
        default=None, metadata=_meta("Save the LoRA every N epochs (default 1 when no save_every_n_steps).")
    )
    save_every_n_steps: int | None = field(default=None, metadata=_meta("Save the LoRA every N steps."))
    checkpoint_every_n_epochs: int | None = field(
        default=None, metadata=_meta("Write a resumable DeepSpeed checkpoint every N epochs.")
    )
    checkpoint_every_n_minutes: float | None = field(
        default=None, metadata=_meta("Write a resumable DeepSpeed checkpoint every N minutes.")
    )
    activation_checkpointing: bool = field(
        default=False, metadata=_meta("Recompute block activations in backward (less memory, ~30% slower).")
    )
    zero_stage: int = field(default=0, metadata=_meta("DeepSpeed ZeRO stage.", (0, 1, 2)))
    pipeline_stages: int = field(default=1, metadata=_meta("Pipeline parallel stages (only 1 is supported).", (1,)))
    seed: int = field(default=42, metadata=_meta("Seed for data order, noise and LoRA init."))
    cache_dir: str | None = field(
        default=None,
        metadata=_meta("Latent/text cache; default STUDIO_HOME/cache/latents, else <output_dir>/../cache."),
    )
    save_dtype: DType = field(
        default="bfloat16", metadata=_meta("Dtype of saved LoRA files.", ("bfloat16", "float16", "float32"))
    )
    caching_batch_size: int = field(default=1, metadata=_meta("Accepted for diffusion-pipe configs; caching encodes one file at a time."))

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> "TrainConfig":
        """Build from a parsed TOML dict. Relative dataset paths resolve against `base_dir`."""
        data = dict(data)
        base = Path(base_dir) if base_dir else None
        dataset = data.get("dataset")
        if isinstance(dataset, str):
            dataset_file = Path(dataset)
            if not dataset_file.is_absolute() and base is not None:
                dataset_file = base / dataset_file
            if not dataset_file.is_file():
                raise ConfigError("dataset", f"dataset file not found: {dataset_file}")
            try:
                data["dataset"] = tomllib.loads(dataset_file.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError("dataset", f"{dataset_file}: invalid TOML: {exc}") from None
            dataset_base: Path | None = dataset_file.parent
        else:
            dataset_base = base
        cfg = _build(cls, data, "")
        if dataset_base is not None:
            for d in cfg.dataset.directory:
                if not Path(d.path).is_absolute():
                    d.path = str((dataset_base / d.path).resolve())
        return cfg

    @classmethod
    def from_toml_string(cls, text: str, base_dir: Path | None = None) -> "TrainConfig":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"invalid TOML: {exc}") from None
        return cls.from_dict(data, base_dir=base_dir)

    @classmethod
    def from_toml_file(cls, path: str | os.PathLike) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file not found: {path}")
        return cls.from_toml_string(path.read_text(encoding="utf-8"), base_dir=path.parent.resolve())

    # ---- output --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _strip_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        """TOML with the dataset inlined (None values are omitted: they mean 'default')."""
        return tomli_w.dumps(self.to_dict())

    # ---- key-path access for forms -------------------------------------------------------------
    def get(self, path: str) -> Any:
        obj: Any = self
        for part in path.split("."):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise ConfigError(path, "no such key")
            obj = getattr(obj, part)
        return obj

    def with_value(self, path: str, value: Any) -> "TrainConfig":
        """A copy with one field replaced; the value is type-checked/coerced like TOML input."""
        parts = path.split(".")
        return _replace_path(self, parts, value, "")

    # ---- derived values ------------------------------------------------------------------------
    @property
    def effective_save_every_n_epochs(self) -> int | None:
        if self.save_every_n_epochs is None and self.save_every_n_steps is None:
            return 1
        return self.save_every_n_epochs

    @property
    def lora_alpha(self) -> int:
        return self.adapter.alpha if self.adapter.alpha is not None else self.adapter.rank

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        studio_home = os.environ.get("STUDIO_HOME")
        if studio_home:
            return Path(studio_home) / "cache" / "latents"
        return Path(self.output_dir).resolve().parent / "cache"

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check values; raise one ConfigError listing every bad key path. Returns self."""
        errors: list[tuple[str, str]] = []

        def check(ok: bool, path: str, reason: str) -> None:
            if not ok:
                errors.append((path, reason))

        check(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.micro_batch_size_per_gpu >= 1, "micro_batch_size_per_gpu", "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        check(self.gradient_clipping >= 0, "gradient_clipping", "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        for key in ("save_every_n_epochs", "save_every_n_steps", "checkpoint_every_n_epochs"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, "must be >= 1")
        minutes = self.checkpoint_every_n_minutes
        check(minutes is None or minutes > 0, "checkpoint_every_n_minutes", "must be > 0")
        check(self.zero_stage in (0, 1, 2), "zero_stage", "must be 0, 1 or 2")
        check(self.pipeline_stages == 1, "pipeline_stages", "only 1 is supported (data parallel over ranks)")
        check(self.caching_batch_size >= 1, "caching_batch_size", "must be >= 1")

        m = self.model
        check(bool(m.ckpt_path.strip()), "model.ckpt_path", "must not be empty")
        check(0.0 <= m.min_t < m.max_t <= 1.0, "model.min_t", "need 0 <= min_t < max_t <= 1")
        check(m.shift > 0, "model.shift", "must be > 0")

        a = self.adapter
        check(1 <= a.rank <= 1024, "adapter.rank", "must be between 1 and 1024")
        check(a.alpha is None or a.alpha > 0, "adapter.alpha", "must be > 0")
        check(0.0 <= a.dropout < 1.0, "adapter.dropout", "must be in [0, 1)")
        check(len(a.target_modules) > 0, "adapter.target_modules", "must name at least one module")

        o = self.optimizer
        check(o.lr > 0, "optimizer.lr", "must be > 0")
        check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", "need two values in [0, 1)")
        check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        check(o.eps > 0, "optimizer.eps", "must be > 0")

        d = self.dataset
        check(len(d.resolutions) > 0, "dataset.resolutions", "must list at least one resolution")
        for i, r in enumerate(d.resolutions):
            check(r >= 16 and r % 16 == 0, f"dataset.resolutions[{i}]", f"{r} must be a multiple of 16 and >= 16")
        check(len(d.frame_buckets) > 0, "dataset.frame_buckets", "must list at least one frame count")
        for i, f in enumerate(d.frame_buckets):
            check(f >= 1 and (f - 1) % 4 == 0, f"dataset.frame_buckets[{i}]", f"{f} is not 4k+1 (1, 5, 9, ..., 33, 81)")
        check(0 < d.min_ar <= d.max_ar, "dataset.min_ar", "need 0 < min_ar <= max_ar")
        check(d.num_ar_buckets >= 1, "dataset.num_ar_buckets", "must be >= 1")
        check(len(d.directory) > 0, "dataset.directory", "add at least one [[directory]] with a path")
        for i, directory in enumerate(d.directory):
            check(bool(directory.path.strip()), f"dataset.directory[{i}].path", "must not be empty")
            check(directory.num_repeats >= 1, f"dataset.directory[{i}].num_repeats", "must be >= 1")
        if errors:
            raise ConfigError(errors)
        return self


# ---- field registry for forms ------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    path: str
    type: str  # "int" | "float" | "bool" | "str" | "list[int]" | "list[float]" | "list[str]"
    default: Any
    choices: tuple | None
    help: str
    optional: bool = False


def config_fields() -> list[FieldSpec]:
    """Every scalar/list field of TrainConfig by key path (nested tables flattened, directories excluded)."""
    specs: list[FieldSpec] = []
    _collect_fields(TrainConfig, "", specs)
    return specs


def _collect_fields(cls: type, prefix: str, out: list[FieldSpec]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            _collect_fields(tp, path + ".", out)
            continue
        inner, optional = _unwrap_optional(tp)
        if typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            continue  # [[directory]] tables are edited as a list, not as form fields
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        choices = f.metadata.get("choices")
        if choices is None and typing.get_origin(inner) is Literal:
            choices = typing.get_args(inner)
        out.append(FieldSpec(path, _type_name(inner), default, choices, f.metadata.get("help", ""), optional))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "str"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


# ---- parsing helpers ---------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


# diffusion-pipe keys this trainer does not take, with what to do instead.
_NO_EVAL = "evaluation runs are not supported by this trainer; remove the key"
_FOREIGN_KEYS = {
    "video_clip_mode": "set it in the dataset ([dataset] video_clip_mode)",
    "eval_every_n_epochs": _NO_EVAL,
    "eval_before_first_step": _NO_EVAL,
    "eval_micro_batch_size_per_gpu": _NO_EVAL,
    "eval_gradient_accumulation_steps": _NO_EVAL,
    "eval_datasets": _NO_EVAL,
    "partition_method": "not used (no pipeline parallelism); remove the key",
    "steps_per_print": "not used (every step is written to metrics.jsonl); remove the key",
    "blocks_to_swap": "block swapping is not supported; use activation_checkpointing and zero_stage",
    "compile": "use the [performance] table (compile_blocks)",
}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "", "expected a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    errors: list[tuple[str, str]] = []
    for key in data:
        if key not in names:
            path = f"{prefix}{key}"
            if path in _FOREIGN_KEYS:
                errors.append((path, _FOREIGN_KEYS[path]))
                continue
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append((path, f"unknown key{hint}"))
    if errors:
        raise ConfigError(errors)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append((path, "required key is missing"))
            continue
        try:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], path)
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(path, "must not be empty")
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, path + ".")
    origin = typing.get_origin(inner)
    if origin is Literal:
        allowed = typing.get_args(inner)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(path, f"{value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(inner)
        if not isinstance(value, (list, tuple)):
            if dataclasses.is_dataclass(item_tp) and isinstance(value, dict):
                value = [value]
            else:
                raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise ConfigError(path, f"unsupported type {inner}")  # pragma: no cover - schema bug


def _replace_path(obj: Any, parts: list[str], value: Any, prefix: str) -> Any:
    name = parts[0]
    path = f"{prefix}{name}"
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(path, f"no such key{hint}")
    if len(parts) == 1:
        tp = typing.get_type_hints(type(obj))[name]
        return dataclasses.replace(obj, **{name: _coerce(tp, value, path)})
    child = getattr(obj, name)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(path, "is not a table")
    return dataclasses.replace(obj, **{name: _replace_path(child, parts[1:], value, path + ".")})


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value
