"""Pre-flight planner: will this training config fit these devices, and how long will it take?

`plan_training(cfg, devices)` estimates peak GPU memory, host RAM, cache size on disk, s/step and
total time from the model's shape (config files only), the largest clip of the dataset, the batch
and the options, with the per-card rates of `engine.planner_rates` (fitted on our own benches).
When the config does not fit, engine.planner proposes the cheapest change that does. No weights
are loaded and nothing here needs a GPU.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import TrainConfig
from engine.planner_rates import CARDS, CPU_RATES, MEMORY, CardRates, card_for_name
from engine.planner_shapes import Clip, ModelShape

logger = logging.getLogger(__name__)

__all__ = ["DeviceSet", "Workload", "Estimate", "estimate", "workload_for", "memory_cap_gib", "GIB", "block_forward_flops"]

GIB = 2**30
TEXT_TOKENS = 512  # Wan's cross-attention length
CAPTION_TOKENS = 100  # cached text per caption (unpadded), an assumption for the cache size
DATA_PARALLEL_EFFICIENCY = 0.98  # 2-GPU scaling through a studio job (bench/RESULTS.md, GPU acceptance)
FP8_LINEAR_OVERHEAD = 0.05  # dequantising fp8 weights before each matmul: assumed, not measured
WEIGHT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}
MEMORY_CAP_ENV = "STUDIO_GPU_MEMORY_CAP_GIB"  # the trainer's stand-in for a smaller card


def memory_cap_gib() -> float | None:
    """STUDIO_GPU_MEMORY_CAP_GIB: the trainer caps its GPU there (set_per_process_memory_fraction)."""
    cap = os.environ.get(MEMORY_CAP_ENV, "").strip()
    return float(cap) if cap else None


@dataclass(frozen=True)
class DeviceSet:
    """Where the run goes: `count` GPUs of one kind, or CPU ranks (memory = host RAM)."""

    kind: str  # "gpu" | "cpu"
    name: str
    memory_gib: float
    count: int = 1

    @classmethod
    def gpus(cls, name: str, memory_gib: float | None = None, count: int = 1) -> "DeviceSet":
        card = card_for_name(name)
        memory = memory_gib if memory_gib is not None else (card.memory_gib if card else 0.0)
        return cls("gpu", name, memory, count)

    @classmethod
    def from_gpu_infos(cls, infos: list[Any], count: int = 1) -> "DeviceSet":
        """From engine.gpus.GpuInfo rows (the smallest card decides), or the CPU when there are none."""
        if not infos:
            return cls.cpu(count)
        smallest = min(infos, key=lambda g: g.memory_total_mib or 0)
        return cls.gpus(smallest.name, (smallest.memory_total_mib or 0) / 1024, count)

    @classmethod
    def choose(cls, infos: list[Any], gpus: str = "", count: int | None = 1, card: str = "") -> "DeviceSet":
        """What Start would use: the GPUs listed in `gpus` ("0,1"), else `count` of this machine's
        (CPU ranks without GPUs); or `card` instead ("RTX 4090" or "RTX 4090:24" GiB) to plan for
        a card this machine does not have."""
        indices = [part.strip() for part in str(gpus or "").split(",") if part.strip()]
        if not all(i.isdigit() for i in indices):
            raise ValueError(f"gpus: expected GPU indices like '0,1', got {gpus!r}")
        count = len(indices) or max(1, int(count or 1))
        if card.strip():
            name, _, memory = card.partition(":")
            try:
                return cls.gpus(name.strip(), float(memory) if memory.strip() else None, count)
            except ValueError:
                raise ValueError(f"card: expected a name and optional GiB like 'RTX 4090:24', got {card!r}") from None
        chosen = [g for g in infos if str(g.index) in indices] if indices else list(infos)[:count]
        if indices and len(chosen) != len(indices):
            raise ValueError(f"gpus: {gpus!r} names a GPU this machine does not have")
        return cls.from_gpu_infos(chosen, count)

    @classmethod
    def cpu(cls, ranks: int = 1, memory_gib: float | None = None) -> "DeviceSet":
        if memory_gib is None:
            import psutil

            memory_gib = psutil.virtual_memory().total / GIB
        return cls("cpu", "CPU", memory_gib, ranks)

    @property
    def rates(self) -> CardRates:
        if self.kind == "cpu":
            return CPU_RATES
        return card_for_name(self.name) or _unknown_card(self.name, self.memory_gib)

    def __str__(self) -> str:
        what = f"{self.name} ({self.memory_gib:.0f} GiB)"
        return f"{self.count} x {what}" if self.count > 1 else what


def _unknown_card(name: str, memory_gib: float) -> CardRates:
    """A card outside the table: assume the slowest listed card's rates (times are then a guess)."""
    slowest = min(CARDS, key=lambda c: c.peak_tflops)
    return slowest.model_copy(update={"name": name, "memory_gib": memory_gib, "measured": False,
                                      "source": f"unknown card: rates of the {slowest.name} row assumed"})


# ---- the work ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The clips a run trains on: the largest (peak memory) and how many of each (time, cache)."""

    largest: Clip
    samples: dict[Clip, int]  # samples per epoch by bucket (repeats counted)
    unique: dict[Clip, int]  # distinct cached samples by bucket
    steps: int | None  # optimizer steps of the run; None when the dataset could not be read
    source: str  # "dataset" (files read) or "config" (resolutions x frame buckets)

    def capped(self, frames: int) -> "Workload":
        def cap(c: Clip) -> Clip:
            return c if c.frames <= frames else Clip(c.width, c.height, frames)

        def merge(counts: dict[Clip, int]) -> dict[Clip, int]:
            out: dict[Clip, int] = {}
            for clip, n in counts.items():
                out[cap(clip)] = out.get(cap(clip), 0) + n
            return out

        return replace(self, largest=cap(self.largest), samples=merge(self.samples), unique=merge(self.unique))


def workload_for(cfg: TrainConfig, shape: ModelShape, world: int, read_files: bool = True) -> Workload:
    """Buckets of the dataset's files when they can be read, else the largest the config allows."""
    if read_files and cfg.dataset.directory:
        try:
            return _workload_from_files(cfg, shape, world)
        except (OSError, ValueError) as exc:  # DatasetError is a ValueError
            logger.debug("planner: dataset not read (%s); using the config's largest bucket", exc)
    return _workload_from_config(cfg, shape)


def _workload_from_files(cfg: TrainConfig, shape: ModelShape, world: int) -> Workload:
    from engine.dataset import plan_dataset

    plan = plan_dataset(cfg.dataset, spatial_multiple=shape.vae_spatial * shape.patch[-1])
    counts = {Clip(b.width, b.height, b.frames): n for b, n in plan.bucket_counts().items()}
    if not counts:
        raise ValueError("no trainable sample")
    unique: dict[Clip, int] = {}
    for s in plan.samples:
        clip = Clip(s.bucket.width, s.bucket.height, s.bucket.frames)
        unique[clip] = unique.get(clip, 0) + 1
    spe = plan.steps_per_epoch(cfg.micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, world)
    return Workload(max(counts, key=shape.tokens), counts, unique, _run_steps(cfg, spe), "dataset")


def _workload_from_config(cfg: TrainConfig, shape: ModelShape) -> Workload:
    from engine.dataset import bucket_sizes, settings_for
    from engine.config import DirectoryConfig

    directories = cfg.dataset.directory or [DirectoryConfig(path="")]
    clips = []
    for directory in directories:
        settings = settings_for(directory, cfg.dataset)
        for resolution in settings.resolutions:
            for width, height in bucket_sizes(resolution, settings.ratios, shape.vae_spatial * shape.patch[-1]):
                clips.append(Clip(width, height, max(settings.frame_buckets)))
    largest = max(clips, key=shape.tokens)
    steps = cfg.max_steps
    return Workload(largest, {largest: 1}, {}, steps, "config")


def _run_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = steps_per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


# ---- one estimate -----------------------------------------------------------------------------------
@dataclass
class Estimate:
    gpu_peak_gib: float  # peak allocated on one GPU (0 on CPU)
    gpu_parts: dict[str, float]
    host_ram_gib: float  # peak host RAM of the whole run (every rank)
    host_parts: dict[str, float]
    cache_gib: float | None  # None: the dataset was not read
    s_per_step: float  # a step of the largest bucket
    mean_s_per_step: float  # over the epoch's bucket mix
    steps: int | None
    total_s: float | None
    memory_gib: float  # what the device offers (GPU memory less the reserve, or host RAM)
    fits: bool
    notes: list[str] = field(default_factory=list)
    time_band: list[float] | None = None  # measured/planned factors seen on this device (CPU: machine load)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def estimate(cfg: TrainConfig, shape: ModelShape, devices: DeviceSet, work: Workload) -> Estimate:
    rates, notes = devices.rates, []
    on_gpu = devices.kind == "gpu"
    gpu = _gpu_memory(cfg, shape, work.largest, devices.count) if on_gpu else {}
    host = _host_memory(cfg, shape, work.largest, devices)
    step = _step_seconds(cfg, shape, work.largest, rates, devices, notes)
    mean = _mean_step_seconds(cfg, shape, work, rates, devices) if work.samples else step
    total = None
    if work.steps is not None:
        total = mean * work.steps + (30.0 if _compiled(cfg, on_gpu) else 0.0)
    gpu_peak = sum(gpu.values())
    host_peak = sum(host.values())
    if on_gpu:
        available = devices.memory_gib - MEMORY.reserve_gib
        fits = gpu_peak <= available
    else:
        available = devices.memory_gib
        fits = host_peak <= available
    notes += _caveats(cfg, shape, rates, step, available if on_gpu else None)
    return Estimate(gpu_peak, gpu, host_peak, host, _cache_gib(shape, work), step, mean, work.steps, total,
                    available, fits, notes, rates.time_band)


def _caveats(cfg: TrainConfig, shape: ModelShape, rates: CardRates, step: float, gpu_gib: float | None) -> list[str]:
    """What the numbers do not cover: unmeasured rates, machine load (CPU), the caching phase."""
    out = [f"times: {rates.source}"] if not rates.measured else []
    if rates.time_band:
        low, high = rates.time_band
        out.append(f"times: measured steps here ran {low:g}-{high:g}x the estimate as other work loaded the "
                   f"machine ({step * low:.2f}-{step * high:.2f} s/step)")
    text_encoder = shape.text_encoder_params * WEIGHT_BYTES[cfg.model.dtype] / GIB
    if gpu_gib is not None and text_encoder > gpu_gib:
        out.append(f"caching: the text encoder alone needs ~{text_encoder:.1f} GiB of GPU memory while the dataset "
                   "is encoded (before training), more than this card: encode the cache on a larger card and "
                   "point cache_dir at it")
    return out


def _compiled(cfg: TrainConfig, on_gpu: bool) -> bool:
    # Block swap changes parameters between steps: the trainer leaves blocks uncompiled then.
    return on_gpu and cfg.performance.compile_blocks and not _swap(cfg)


def _swap(cfg: TrainConfig) -> int:
    return cfg.blocks_to_swap or 0


def _weight_dtype(cfg: TrainConfig) -> str:
    return cfg.model.transformer_dtype or cfg.model.dtype


def _gpu_memory(cfg: TrainConfig, shape: ModelShape, clip: Clip, world: int) -> dict[str, float]:
    dtype = _weight_dtype(cfg)
    compute_bytes = WEIGHT_BYTES[cfg.model.dtype if dtype == "float8" else dtype]
    linear_bytes = WEIGHT_BYTES[dtype]
    block_bytes = shape.block_linear_params * linear_bytes + (shape.block_params - shape.block_linear_params) * compute_bytes
    swapped = min(_swap(cfg), shape.layers)
    # The block in use + the one being copied; without checkpointing autograd keeps every copy for backward.
    resident_blocks = shape.layers - swapped + (min(swapped, 2) if cfg.activation_checkpointing else swapped)
    lora = shape.lora_params(cfg.adapter.rank, cfg.adapter.target_modules) * WEIGHT_BYTES[cfg.adapter.dtype]
    zero = cfg.zero_stage
    optimizer_state = 2 * lora / (world if zero >= 1 else 1)
    grads = lora / (world if zero >= 2 else 1)
    return {
        "base weights": (resident_blocks * block_bytes + shape.other_params * compute_bytes) / GIB,
        "LoRA weights, gradients, optimizer": (lora + grads + optimizer_state) / GIB,
        "activations": _activation_bytes(cfg, shape, clip, compute_bytes, _compiled(cfg, True)) / GIB,
    }


def _activation_bytes(cfg: TrainConfig, shape: ModelShape, clip: Clip, dtype_bytes: int, compiled: bool) -> float:
    m = MEMORY
    tokens = shape.tokens(clip) * cfg.micro_batch_size_per_gpu
    d, layers = shape.width, shape.layers
    scale = dtype_bytes / 2  # fitted in bf16
    mode = _checkpointing(cfg)
    factor = m.working_factor[("full" if mode == "offload" else mode) + ("+compiled" if compiled else "")]
    working = tokens * (m.working_per_width * d + m.working_per_ffn * shape.ffn) * scale
    if dtype_bytes < 4:  # the fp32 copies of LoRA inputs are their own part (fp32 models make none)
        lora_copies = tokens * (m.lora_fp32_input_per_width * d + m.lora_fp32_input_per_ffn * shape.ffn)
        kept_copies = cfg.adapter.dtype == "float32" and cfg.performance.lora_compute_dtype == "adapter"
        working = (working - lora_copies) * factor + (lora_copies if kept_copies else 0.0)
    else:
        working *= factor
    if not cfg.activation_checkpointing:
        return layers * m.kept_fraction_no_checkpointing * working + working
    # each block's input; offloaded, only the one brought back for its block's recompute
    kept = (1 if mode == "offload" else layers) * tokens * d * dtype_bytes
    if cfg.performance.checkpointing == "save_attention":
        kept += layers * tokens * d * m.save_attention_bytes_per_token_width * scale
    return kept + working


def _checkpointing(cfg: TrainConfig) -> str:
    return cfg.performance.checkpointing if cfg.activation_checkpointing else "off"


def _offloaded_bytes(cfg: TrainConfig, shape: ModelShape, clip: Clip, dtype_bytes: int, pinned: bool = False) -> float:
    """What checkpointing = "offload" copies to host memory in a micro-batch's forward (and back for the
    recompute): each block's inputs, the hidden states and, block after block, the shared text states and
    RoPE tables (fp32; torch's save_on_cpu copies every saved tensor). `pinned`: as held by torch's pinned
    host allocator, which rounds each buffer up to a power of two."""
    if _checkpointing(cfg) != "offload":
        return 0.0
    batch = cfg.micro_batch_size_per_gpu
    tokens = shape.tokens(clip) * batch
    buffers = [tokens * shape.width * dtype_bytes, batch * TEXT_TOKENS * shape.width * dtype_bytes]
    buffers += 2 * [tokens * shape.head_dim * 4]  # cos and sin
    if pinned:
        buffers = [2 ** math.ceil(math.log2(b)) for b in buffers]
    return shape.layers * sum(buffers)


def _host_memory(cfg: TrainConfig, shape: ModelShape, clip: Clip, devices: DeviceSet) -> dict[str, float]:
    """Per run: every rank loads the text encoder (caching) and then the transformer, one after the
    other, in the model dtype; block swap keeps the swapped blocks in pinned host memory, activation
    offload the checkpointed blocks' inputs."""
    ranks = devices.count
    if devices.kind == "cpu":  # the model runs here, in float32
        loaded = shape.params * 4
        lora = shape.lora_params(cfg.adapter.rank, cfg.adapter.target_modules) * 16
        activations = _activation_bytes(cfg, shape, clip, 4, False) + _offloaded_bytes(cfg, shape, clip, 4)
        text = shape.text_encoder_params * 4
        return {"processes": ranks * MEMORY.process_host_gib_cpu,
                "model, LoRA and activations": ranks * (max(loaded, text) + lora + activations) / GIB}
    model_bytes = WEIGHT_BYTES[cfg.model.dtype]
    transformer = shape.params * model_bytes  # loaded in the model dtype before fp8 / swap placement
    text = shape.text_encoder_params * model_bytes
    swapped = min(_swap(cfg), shape.layers)
    pinned = swapped * shape.block_params * WEIGHT_BYTES[_weight_dtype(cfg)]
    offloaded = _offloaded_bytes(cfg, shape, clip, model_bytes, pinned=True)
    return {"processes": ranks * MEMORY.process_host_gib,
            "loading (text encoder, then transformer)": ranks * max(transformer, text) / GIB,
            "pinned swapped blocks": ranks * pinned / GIB,
            "pinned offloaded activations": ranks * offloaded / GIB}


def _cache_gib(shape: ModelShape, work: Workload) -> float | None:
    if work.source != "dataset":
        return None
    per_caption = CAPTION_TOKENS * shape.text_dim * 4
    total = sum(n * (shape.latent_elements(clip) * 4 + per_caption) for clip, n in work.unique.items())
    return total / GIB


# ---- time ------------------------------------------------------------------------------------------
def _attention_kernel(cfg: TrainConfig, rates: CardRates) -> str:
    name = cfg.performance.attention_backend
    if name == "flash3" and not rates.hopper:
        name = "cudnn"
    if name == "default":
        name = "cudnn" if rates.hopper else "flash"
    return name if name in rates.attention_tflops else next(iter(rates.attention_tflops))


def block_forward_flops(shape: ModelShape, clip: Clip) -> tuple[float, float]:
    """FLOPs of one block's forward on one sample: (linears, attention). Training and the inference
    CPU estimate (engine.inference.estimate) both count from here."""
    tokens, d, f = shape.tokens(clip), shape.width, shape.ffn
    f_lin = 12 * tokens * d * d + 4 * tokens * d * f + 4 * TEXT_TOKENS * d * d
    f_att = 4 * tokens * tokens * d + 4 * tokens * TEXT_TOKENS * d
    return f_lin, f_att


def _micro_seconds(cfg: TrainConfig, shape: ModelShape, clip: Clip, rates: CardRates, on_gpu: bool,
                   notes: list[str] | None = None) -> float:
    """One forward + backward of one micro-batch on one device."""
    batch, tokens, d, layers = cfg.micro_batch_size_per_gpu, shape.tokens(clip), shape.width, shape.layers
    f_lin, f_att = block_forward_flops(shape, clip)
    ckpt = cfg.activation_checkpointing
    recompute_attention = 1 if _checkpointing(cfg) in ("full", "offload") else 0
    kernel = _attention_kernel(cfg, rates)
    attention = layers * batch * f_att * (3 + recompute_attention) / (rates.attention_tflops[kernel] * 1e12)
    linears = layers * batch * f_lin * (3 if ckpt else 2) / (rates.gemm_tflops * 1e12)
    if _weight_dtype(cfg) == "float8":
        linears *= 1 + FP8_LINEAR_OVERHEAD
    per_element = rates.elementwise_ns if _compiled(cfg, on_gpu) else rates.elementwise_uncompiled_ns
    elementwise = layers * batch * tokens * d * per_element * 1e-9 * (1.0 if ckpt else 0.67)
    lora = 0.0
    if on_gpu and cfg.adapter.dtype == "float32" and cfg.performance.lora_compute_dtype == "adapter":
        lora = layers * batch * tokens * shape.lora_input_width(cfg.adapter.target_modules) * rates.fp32_lora_ns * 1e-9
    compute = attention + linears + elementwise + lora
    stall = _swap_stall(cfg, shape, rates, compute) if on_gpu else 0.0
    if notes is not None and stall > 0:
        notes.append(f"block swap: about {stall:.2f} s a micro-batch waiting for host-to-device copies "
                     f"(at an assumed {rates.h2d_gb_s:g} GB/s)")
    offload = _offload_seconds(cfg, shape, clip, rates) if on_gpu else 0.0
    if notes is not None and offload > 0:
        notes.append(f"activation offload: about {offload:.2f} s a micro-batch copying block inputs to host "
                     f"memory and back (at {rates.h2d_gb_s:g} GB/s each way)")
    return compute + stall + offload


def _offload_seconds(cfg: TrainConfig, shape: ModelShape, clip: Clip, rates: CardRates) -> float:
    """save_on_cpu's copies run on the compute stream: device-to-host in forward, back before each
    recompute, not hidden behind compute."""
    compute_bytes = WEIGHT_BYTES[cfg.model.dtype]
    return 2 * _offloaded_bytes(cfg, shape, clip, compute_bytes) / (rates.h2d_gb_s * 1e9)


def _swap_stall(cfg: TrainConfig, shape: ModelShape, rates: CardRates, compute: float) -> float:
    """Copies of a swapped block overlap the previous block's work (one block ahead); what does not
    overlap is waited for, once in forward and once in backward."""
    swapped = min(_swap(cfg), shape.layers)
    if swapped == 0:
        return 0.0
    dtype = _weight_dtype(cfg)
    block_bytes = shape.block_linear_params * WEIGHT_BYTES[dtype] + (shape.block_params - shape.block_linear_params) * 2
    copy = block_bytes / (rates.h2d_gb_s * 1e9)
    per_block = compute / shape.layers
    return swapped * (max(0.0, copy - per_block / 3) + max(0.0, copy - 2 * per_block / 3))


def _step_seconds(cfg: TrainConfig, shape: ModelShape, clip: Clip, rates: CardRates, devices: DeviceSet,
                  notes: list[str] | None = None) -> float:
    on_gpu = devices.kind == "gpu"
    step = cfg.gradient_accumulation_steps * _micro_seconds(cfg, shape, clip, rates, on_gpu, notes) + rates.host_s
    if devices.count > 1 and on_gpu:
        step /= DATA_PARALLEL_EFFICIENCY
    return step


def _mean_step_seconds(cfg: TrainConfig, shape: ModelShape, work: Workload, rates: CardRates,
                       devices: DeviceSet) -> float:
    """Batches are drawn from one bucket at a time: the mean over the epoch's batches."""
    batch = cfg.micro_batch_size_per_gpu
    counts = {clip: math.ceil(n / batch) for clip, n in work.samples.items()}
    total = sum(counts.values())
    return sum(n * _step_seconds(cfg, shape, clip, rates, devices) for clip, n in counts.items()) / total
