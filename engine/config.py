"""Typed training configuration in the diffusion-pipe TOML shape.

One main file (`output_dir`, `epochs`, `[model]`, `[adapter]`, `[optimizer]`, ...) plus a dataset
file named by `dataset = "dataset.toml"` or an inline `[dataset]` table. Every table is a pydantic
model: parsing rejects unknown keys with a suggestion and wrong types with the key path (pydantic's
errors are rewritten as `ConfigError`s); `validate()` checks values and raises one `ConfigError`
naming every bad key path. Parsing and checking are two steps on purpose: the form builds a config
value by value (`with_value`) and shows every bad value at once when it is submitted.

The UI binds widgets through `config_fields()` and `TrainConfig.get(path)` / `with_value(path, v)`.
"""

from __future__ import annotations

import copy
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import tomli_w
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from engine.config_types import (Bool, ConfigError, Float, Int, Str, config_error, is_table, strip_annotated,
                                 suggest, unwrap_optional)

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


DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

LrScheduler = Literal["constant", "linear", "cosine"]
TimestepMethod = Literal["logit_normal", "uniform"]
DType = Literal["bfloat16", "float16", "float32"]
AttentionBackend = Literal["default", "cudnn", "flash", "efficient", "flash3"]
CheckpointPolicyName = Literal["full", "save_attention"]
LoraComputeDtype = Literal["adapter", "activation"]


class _Table(BaseModel):
    """One TOML table. Direct construction and assignment raise ConfigError with the table's key path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    table_path: ClassVar[str] = ""  # where the table sits in the TOML, e.g. "optimizer."

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.table_path) from None

    # Otherwise pydantic would call this __init__ for every nested table it validates, and the
    # outer table would see a ConfigError instead of the errors it rewrites with the full path.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.table_path) from None

    @classmethod
    def parse(cls, data: Any, *, from_attributes: bool = False) -> Any:
        """Validate a parsed TOML table (or, with `from_attributes`, an object with the same fields)."""
        try:
            return cls.model_validate(data, from_attributes=from_attributes)
        except ValidationError as exc:
            raise config_error(exc, cls, cls.table_path) from None


class DirectoryConfig(_Table):
    path: Str = Field(description="Folder of images/videos with same-name .txt captions.")
    num_repeats: Int = Field(1, description="How many times each file is seen per epoch.")


def _one_table_is_a_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value  # `[dataset.directory]` written once


class DatasetConfig(_Table):
    table_path = "dataset."

    resolutions: list[Int] = Field(
        [512], description="Training side lengths; each sample is resized to about side x side pixels (area).")
    enable_ar_bucket: Bool = Field(True, description="Group samples into aspect-ratio buckets.")
    min_ar: Float = Field(0.5, description="Smallest aspect ratio (width/height) bucket.")
    max_ar: Float = Field(2.0, description="Largest aspect ratio (width/height) bucket.")
    num_ar_buckets: Int = Field(7, description="Number of aspect-ratio buckets (log-spaced).")
    frame_buckets: list[Int] = Field([1, 33], description="Frame counts clips are cut to (each 4k+1; 1 = single image).")
    video_clip_mode: Literal["single_beginning", "single_middle"] = Field(
        "single_beginning", description="Where a clip is taken from a longer video.")
    directory: Annotated[list[DirectoryConfig], BeforeValidator(_one_table_is_a_list)] = Field(
        [], description="[[directory]] tables: path + num_repeats.")


class ModelConfig(_Table):
    table_path = "model."

    type: Literal["wan"] = Field("wan", description="Model family.")
    ckpt_path: Str = Field("demo", description="'demo' or a local diffusers folder (with model_index.json).")
    transformer_subfolder: Str = Field(
        "transformer",
        description="Transformer to train. Wan2.2 A14B: 'transformer' = high-noise expert, "
                    "'transformer_2' = low-noise expert (set min_t/max_t to its range).")
    dtype: DType = Field("bfloat16", description="Dtype of the frozen model on GPU (CPU always uses float32).")
    transformer_dtype: DType | None = Field(None, description="Transformer dtype on GPU; default = dtype.")
    timestep_sample_method: TimestepMethod = Field("logit_normal", description="How training noise levels are drawn.")
    shift: Float = Field(1.0, description="Flow shift applied to sampled t (1 = none, >1 = noisier).")
    min_t: Float = Field(0.0, description="Lowest noise level trained (0..1).")
    max_t: Float = Field(1.0, description="Highest noise level trained (0..1).")


class AdapterConfig(_Table):
    table_path = "adapter."

    type: Literal["lora"] = Field("lora", description="Adapter type.")
    rank: Int = Field(32, description="LoRA rank.")
    alpha: Int | None = Field(None, description="LoRA alpha; default = rank (scale 1).")
    dropout: Float = Field(0.0, description="LoRA dropout probability.")
    dtype: DType = Field("float32", description="Dtype of the trained LoRA weights on GPU.")
    target_modules: list[Str] = Field(
        list(DEFAULT_LORA_TARGETS), description="Linear layers (name suffixes inside each block) that get LoRA.")
    init_from_existing: Str | None = Field(None, description="LoRA folder or .safetensors file to start from.")


class OptimizerConfig(_Table):
    table_path = "optimizer."

    type: Literal["adamw", "adamw_optimi", "AdamW"] = Field("adamw", description="Optimizer (torch AdamW).")
    lr: Float = Field(2e-5, description="Peak learning rate.")
    betas: list[Float] = Field([0.9, 0.99], description="Adam betas.")
    weight_decay: Float = Field(0.01, description="Decoupled weight decay.")
    eps: Float = Field(1e-8, description="Adam epsilon.")


class PerformanceConfig(_Table):
    """Speed options, applied by `engine.families.wan_perf.apply` (there named `PerfOptions`).

    The defaults change nothing, so a machine without a GPU behaves as without the table.
    """

    table_path = "performance."

    attention_backend: AttentionBackend = Field(
        "default",
        description="Attention kernel tried first; 'default' keeps PyTorch's choice (cuDNN on Hopper); "
                    "'flash3' is FlashAttention-3 (Hopper, installed separately).")
    compile_blocks: Bool = Field(False, description="torch.compile each transformer block (GPU; first step ~30 s slower).")
    checkpointing: CheckpointPolicyName = Field(
        "full",
        description="With activation checkpointing: recompute whole blocks, or keep self-attention outputs "
                    "(faster, a little more memory).")
    lora_compute_dtype: LoraComputeDtype = Field(
        "adapter", description="LoRA matmuls in adapter.dtype, or in the model dtype (bf16) with fp32 weights kept.")

    @classmethod
    def from_config(cls, section: Any | None) -> "PerformanceConfig":
        """From this model, a dict, an object with the same attributes (missing ones: default), or None."""
        if section is None:
            return cls()
        if isinstance(section, cls):
            return section
        return cls.parse(section, from_attributes=not isinstance(section, dict))


class TrainConfig(_Table):
    output_dir: Str = Field(description="Where run directories are created (output_dir/<timestamp>).")
    dataset: DatasetConfig = Field(
        default_factory=DatasetConfig, description="Dataset: a path to a dataset TOML, or an inline table.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="[model] table.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="[adapter] table.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="[optimizer] table.")
    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig, description="[performance] table: GPU speed options.")
    epochs: Int = Field(10, description="Passes over the dataset.")
    max_steps: Int | None = Field(None, description="Stop after this many optimizer steps (optional).")
    micro_batch_size_per_gpu: Int = Field(1, description="Samples per rank per forward.")
    gradient_accumulation_steps: Int = Field(1, description="Micro-batches per optimizer step.")
    gradient_clipping: Float = Field(1.0, description="Max gradient norm (0 = off).")
    warmup_steps: Int = Field(0, description="Linear lr warmup steps.")
    lr_scheduler: LrScheduler = Field("constant", description="Schedule after warmup.")
    save_every_n_epochs: Int | None = Field(
        None, description="Save the LoRA every N epochs (default 1 when no save_every_n_steps).")
    save_every_n_steps: Int | None = Field(None, description="Save the LoRA every N steps.")
    checkpoint_every_n_epochs: Int | None = Field(
        None, description="Write a resumable DeepSpeed checkpoint every N epochs.")
    checkpoint_every_n_minutes: Float | None = Field(
        None, description="Write a resumable DeepSpeed checkpoint every N minutes.")
    activation_checkpointing: Bool = Field(
        False, description="Recompute block activations in backward (less memory, ~30% slower).")
    # Plain ints with a choice list: a Literal would reject 3 when parsing, but validate() says why.
    zero_stage: Int = Field(0, description="DeepSpeed ZeRO stage.", json_schema_extra={"choices": (0, 1, 2)})
    pipeline_stages: Int = Field(
        1, description="Pipeline parallel stages (only 1 is supported).", json_schema_extra={"choices": (1,)})
    seed: Int = Field(42, description="Seed for data order, noise and LoRA init.")
    cache_dir: Str | None = Field(
        None, description="Latent/text cache; default STUDIO_HOME/cache/latents, else <output_dir>/../cache.")
    save_dtype: DType = Field("bfloat16", description="Dtype of saved LoRA files.")
    caching_batch_size: Int = Field(
        1, description="Accepted for diffusion-pipe configs; caching encodes one file at a time.")
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
        cfg = cls.parse(data)
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
        return self.model_dump(exclude_none=True)

    def to_toml(self) -> str:
        """TOML with the dataset inlined (None values are omitted: they mean 'default')."""
        return tomli_w.dumps(self.to_dict())

    # ---- key-path access for forms -------------------------------------------------------------
    def get(self, path: str) -> Any:
        obj: Any = self
        for part in path.split("."):
            if not isinstance(obj, BaseModel) or part not in type(obj).model_fields:
                raise ConfigError(path, "no such key")
            obj = getattr(obj, part)
        return obj

    def with_value(self, path: str, value: Any) -> "TrainConfig":
        """A copy with one field replaced; the value is type-checked/coerced like TOML input."""
        return _replace_path(self, path.split("."), value, "")

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


def _collect_fields(cls: type[BaseModel], prefix: str, out: list[FieldSpec]) -> None:
    for name, info in cls.model_fields.items():
        path = f"{prefix}{name}"
        inner, optional = unwrap_optional(info.annotation)
        if is_table(inner):
            _collect_fields(inner, path + ".", out)
            continue
        if typing.get_origin(inner) is list and is_table(strip_annotated(typing.get_args(inner)[0])):
            continue  # [[directory]] tables are edited as a list, not as form fields
        # A fresh copy: the form may mutate a list default.
        default = None if info.is_required() else copy.deepcopy(info.get_default(call_default_factory=True))
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        choices = extra.get("choices")
        if choices is None and typing.get_origin(inner) is Literal:
            choices = typing.get_args(inner)
        out.append(FieldSpec(path, _type_name(inner), default, choices, info.description or "", optional))


def _type_name(tp: Any) -> str:
    tp = strip_annotated(tp)
    if typing.get_origin(tp) is Literal:
        return "str"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _replace_path(obj: _Table, parts: list[str], value: Any, prefix: str) -> Any:
    name = parts[0]
    path = f"{prefix}{name}"
    fields = type(obj).model_fields
    if name not in fields:
        raise ConfigError(path, f"no such key{suggest(name, fields)}")
    if len(parts) == 1:
        changed = obj.model_copy()
        setattr(changed, name, value)  # validate_assignment: checked like TOML input
        return changed
    child = getattr(obj, name)
    if not isinstance(child, _Table):
        raise ConfigError(path, "is not a table")
    return obj.model_copy(update={name: _replace_path(child, parts[1:], value, path + ".")})
