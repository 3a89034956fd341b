"""Typed training configuration in the diffusion-pipe TOML shape.

One main file (`output_dir`, `epochs`, `[model]`, `[adapter]`, `[optimizer]`, ...) plus a dataset
file named by `dataset = "dataset.toml"` or an inline `[dataset]` table. Every table is a pydantic
model: parsing rejects unknown keys with a suggestion and wrong types with the key path (pydantic's
errors are rewritten as `ConfigError`s); `validate()` checks values and raises one `ConfigError`
naming every bad key path. Parsing and checking are two steps on purpose: the form builds a config
value by value (`with_value`) and shows every bad value at once when it is submitted.

The UI binds widgets through `engine.config_fields` and `TrainConfig.get(path)` / `with_value(path, v)`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, Field, PrivateAttr

from engine import config_compat, optimizers
from engine.config_dataset import (DatasetConfig, DirectoryConfig, EvalDatasetConfig, dataset_errors,
                                   load_dataset_table, resolve_directories)
from engine.config_sample import SampleConfig, sample_errors
from engine.config_types import Bool, ConfigError, ConfigTable, Float, Int, Str, suggest

__all__ = ["ConfigError", "DirectoryConfig", "DatasetConfig", "EvalDatasetConfig", "ModelConfig", "AdapterConfig",
           "OptimizerConfig", "PerformanceConfig", "SampleConfig", "TrainConfig", "DEFAULT_LORA_TARGETS"]


MAX_BATCH = 4096  # micro batch and accumulation: far above any real run, refuses typos like 10**20
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

LrScheduler = Literal["constant", "linear", "cosine"]
TimestepMethod = Literal["logit_normal", "uniform"]
DType = Literal["bfloat16", "float16", "float32"]
TransformerDType = Literal["bfloat16", "float16", "float32", "float8"]
AttentionBackend = Literal["default", "cudnn", "flash", "efficient", "flash3"]
CheckpointPolicyName = Literal["full", "save_attention", "offload"]
LoraComputeDtype = Literal["adapter", "activation"]
Experts = Literal["one", "both"]
IdleExpert = Literal["offload", "resident"]


class ModelConfig(ConfigTable):
    table_path = "model."

    type: Literal["wan"] = Field("wan", description="Model family.")
    ckpt_path: Str = Field("demo", description="'demo' or a local diffusers folder (with model_index.json).")
    transformer_subfolder: Str = Field(
        "transformer",
        description="Transformer to train. Wan2.2 A14B: 'transformer' = high-noise expert, "
                    "'transformer_2' = low-noise expert (set min_t/max_t to its range).")
    dtype: DType = Field("bfloat16", description="Dtype of the frozen model on GPU (CPU always uses float32).")
    transformer_dtype: TransformerDType | None = Field(
        None, description="Transformer dtype on GPU; default = dtype. 'float8': the blocks' frozen linear weights "
                          "in fp8 (torchao), computed in dtype.")
    transformer_path: Str | None = Field(
        None, description="Transformer to train instead of ckpt_path's: a diffusers folder, a folder of "
                          "ckpt_path (Wan2.2 'high_noise_model'), or a single .safetensors file (ComfyUI).",
        json_schema_extra={"form": False})
    timestep_sample_method: TimestepMethod = Field("logit_normal", description="How training noise levels are drawn.")
    shift: Float = Field(1.0, description="Flow shift applied to sampled t (1 = none, >1 = noisier).")
    min_t: Float = Field(0.0, description="Lowest noise level trained (0..1).")
    max_t: Float = Field(1.0, description="Highest noise level trained (0..1).")
    # Two-expert keys are TOML/preset-only (not form fields); None means the default named in each.
    experts: Experts | None = Field(
        None, description="Wan2.2 A14B: 'both' trains a LoRA for each expert in one run (t >= boundary: "
                           "high-noise expert, below: low-noise); default 'one' (transformer_subfolder only).",
        json_schema_extra={"form": False})
    boundary_ratio: Float | None = Field(
        None, description="Noise level splitting the two experts; default the model's own (model_index.json).",
        json_schema_extra={"form": False})
    idle_expert: IdleExpert | None = Field(
        None, description="With experts = 'both' on a GPU: 'offload' (default) keeps the idle expert's frozen "
                          "weights in host memory, 'resident' keeps both experts on the GPU.",
        json_schema_extra={"form": False})
    image_to_video: Bool | None = Field(
        None, description="Train image-to-video (the clip's first frame is the start image). Default: the model's "
                          "own (Wan I2V models: yes; Wan2.2 TI2V-5B: no, true trains its image mode).",
        json_schema_extra={"form": False})

    @property
    def compute_dtype(self) -> str:
        """The transformer's dtype on a GPU for activations and non-fp8 weights (fp8 stores weights only)."""
        return self.dtype if self.transformer_dtype in (None, "float8") else self.transformer_dtype


class AdapterConfig(ConfigTable):
    table_path = "adapter."

    type: Literal["lora"] = Field("lora", description="Adapter type.")
    rank: Int = Field(32, description="LoRA rank.")
    alpha: Int | None = Field(None, description="LoRA alpha; default = rank (scale 1).")
    dropout: Float = Field(0.0, description="LoRA dropout probability.")
    dtype: DType = Field("float32", description="Dtype of the trained LoRA weights on GPU.")
    target_modules: list[Str] = Field(
        list(DEFAULT_LORA_TARGETS), description="Linear layers (name suffixes inside each block) that get LoRA.")
    init_from_existing: Str | None = Field(None, description="LoRA folder or .safetensors file to start from.")


class OptimizerConfig(ConfigTable):
    table_path = "optimizer."

    type: Str = Field("adamw", description="Optimizer (diffusion-pipe's names; see engine/optimizers.py).",
                      json_schema_extra={"choices": ("adamw", "adamw_optimi", "AdamW")})
    lr: Float = Field(2e-5, description="Peak learning rate.")
    betas: list[Float] = Field([0.9, 0.99], description="Adam betas.")
    weight_decay: Float = Field(0.01, description="Decoupled weight decay.")
    eps: Float = Field(1e-8, description="Adam epsilon.")
    loraplus_lr_ratio: Float | None = Field(
        None, description="LoRA+: the LoRA B matrices learn this many times faster than lr (e.g. 16; none: same lr).")


class PerformanceConfig(ConfigTable):
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
        description="With activation checkpointing: recompute whole blocks, keep self-attention outputs "
                    "(faster, a little more memory), or recompute whole blocks and keep their inputs in pinned "
                    "host memory ('offload': least GPU memory, host copies each step; diffusion-pipe's 'unsloth').")
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


class TrainConfig(ConfigTable):
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
    caption_dropout_rate: Float | None = Field(
        None, description="Share of training samples given the empty caption, so that classifier-free guidance "
                         "(the empty prompt's prediction) follows what the adapter learns.")
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
    blocks_to_swap: Int | None = Field(
        None, description="Keep the frozen weights of the last N transformer blocks in pinned host memory and copy "
                          "each to the GPU one block ahead of use (saves memory with activation_checkpointing; default 0).",
        json_schema_extra={"form": False})
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
    # ---- evaluation (diffusion-pipe's keys); not in the form ------------------------------------
    eval_datasets: list[EvalDatasetConfig] | None = Field(
        None, description="[[eval_datasets]]: name + config (a dataset TOML) or an inline dataset table.",
        json_schema_extra={"form": False})
    eval_every_n_epochs: Int | None = Field(None, description="Eval loss every N epochs.", json_schema_extra={"form": False})
    eval_every_n_steps: Int | None = Field(None, description="Eval loss every N steps.", json_schema_extra={"form": False})
    eval_before_first_step: Bool | None = Field(None, description="Eval loss before training starts.",
                                         json_schema_extra={"form": False})
    eval_micro_batch_size_per_gpu: Int | None = Field(
        None, description="Eval micro batch; default micro_batch_size_per_gpu.", json_schema_extra={"form": False})
    eval_gradient_accumulation_steps: Int | None = Field(
        None, description="Accepted for diffusion-pipe configs: the eval loss is the mean over every eval sample.",
        json_schema_extra={"form": False})
    sample: SampleConfig | None = Field(
        None, description="[sample]: videos drawn with the LoRA at save time.", json_schema_extra={"form": False})
    _warnings: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> "TrainConfig":
        """Build from a parsed TOML dict. Relative dataset paths resolve against `base_dir`.
        diffusion-pipe keys are translated first (`engine.config_compat`); `warnings` lists them."""
        data = dict(data)
        base = Path(base_dir) if base_dir else None
        data["dataset"], dataset_base = load_dataset_table(data.get("dataset", {}), "dataset", base)
        eval_bases = []
        if isinstance(data.get("eval_datasets"), list):  # diffusion-pipe: {name, config = 'eval.toml'}
            data["eval_datasets"] = [dict(e) if isinstance(e, dict) else e for e in data["eval_datasets"]]
        for i, entry in enumerate(data.get("eval_datasets") or []):
            entry_base = base
            if isinstance(entry, dict) and "config" in entry:
                entry["dataset"], entry_base = load_dataset_table(entry.pop("config"), f"eval_datasets[{i}].config",
                                                                  base)
            eval_bases.append(entry_base)
        warnings = config_compat.translate_main(data)
        cfg = cls.parse(data)
        resolve_directories(cfg.dataset, dataset_base)
        for entry, entry_base in zip(cfg.eval_datasets or [], eval_bases):
            resolve_directories(entry.dataset, entry_base)
        cfg._warnings = warnings + cfg._optimizer_warning()
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
    def warnings(self) -> list[str]:
        """What the studio does instead of keys it accepted but does not implement, one line each."""
        return [f"{path}: {why}" for path, why in self._warnings]

    def _optimizer_warning(self) -> list[tuple[str, str]]:
        try:
            note = optimizers.choose(self.optimizer.type).warning
        except ConfigError:
            return []  # validate() names it
        return [("optimizer.type", note)] if note else []

    @property
    def eval_micro_batch_size(self) -> int:
        return self.eval_micro_batch_size_per_gpu or self.micro_batch_size_per_gpu

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
        for key in ("micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
            check(getattr(self, key) <= MAX_BATCH, key, f"must be <= {MAX_BATCH}")
        check(self.gradient_clipping >= 0, "gradient_clipping", "must be >= 0")
        check(self.caption_dropout_rate is None or 0 <= self.caption_dropout_rate < 1, "caption_dropout_rate",
              "must be in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        for key in ("save_every_n_epochs", "save_every_n_steps", "checkpoint_every_n_epochs"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, "must be >= 1")
        minutes = self.checkpoint_every_n_minutes
        check(minutes is None or minutes > 0, "checkpoint_every_n_minutes", "must be > 0")
        check(self.zero_stage in (0, 1, 2), "zero_stage", "must be 0, 1 or 2")
        check(self.pipeline_stages == 1, "pipeline_stages", "only 1 is supported (data parallel over ranks)")
        check(self.caching_batch_size >= 1, "caching_batch_size", "must be >= 1")
        check((self.blocks_to_swap or 0) >= 0, "blocks_to_swap", "must be >= 0")

        m = self.model
        check(bool(m.ckpt_path.strip()), "model.ckpt_path", "must not be empty")
        check(0.0 <= m.min_t < m.max_t <= 1.0, "model.min_t", "need 0 <= min_t < max_t <= 1")
        check(m.shift > 0, "model.shift", "must be > 0")
        if m.experts == "both":
            errors += _two_expert_errors(self)
            check(not self.blocks_to_swap and m.transformer_dtype != "float8", "model.experts",
                  "'both' cannot be combined with blocks_to_swap or transformer_dtype = 'float8' yet")

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
        check(o.loraplus_lr_ratio is None or o.loraplus_lr_ratio >= 1, "optimizer.loraplus_lr_ratio", "must be >= 1")

        try:
            optimizers.choose(o.type)
        except ConfigError as exc:
            errors += exc.errors
        for key in ("eval_every_n_epochs", "eval_every_n_steps", "eval_micro_batch_size_per_gpu",
                    "eval_gradient_accumulation_steps"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, "must be >= 1")
        errors += dataset_errors(self.dataset)
        if self.sample is not None:
            errors += sample_errors(self.sample)
        for i, entry in enumerate(self.eval_datasets or []):
            errors += dataset_errors(entry.dataset, f"eval_datasets[{i}].dataset")
        if errors:
            raise ConfigError(errors)
        return self


def _two_expert_errors(cfg: "TrainConfig") -> list[tuple[str, str]]:
    m, errors = cfg.model, []
    if m.boundary_ratio is not None and not m.min_t < m.boundary_ratio < m.max_t:
        errors.append(("model.boundary_ratio", "must lie strictly between min_t and max_t, or one expert never trains"))
    if m.transformer_path is not None:
        errors.append(("model.transformer_path", "names one transformer; with experts = 'both' both come from ckpt_path"))
    if cfg.zero_stage != 0:  # ZeRO's flat buffers would give the idle expert zero gradients: Adam still moves it
        errors.append(("zero_stage", "must be 0 with experts = 'both' (each step trains one expert's LoRA)"))
    return errors


# ---- field registry for forms ------------------------------------------------------------------


def _replace_path(obj: ConfigTable, parts: list[str], value: Any, prefix: str) -> Any:
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
    if not isinstance(child, ConfigTable):
        raise ConfigError(path, "is not a table")
    return obj.model_copy(update={name: _replace_path(child, parts[1:], value, path + ".")})
