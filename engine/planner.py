"""Pre-flight planner: will this training config fit, and how long will it take?

`plan_training(cfg, devices)` estimates peak GPU memory, host RAM, cache size on disk, s/step and
total time (engine.planner_estimate) from the model's shape (config files only), the largest clip
of the dataset, the batch and the options, with the per-card rates of `engine.planner_rates`
(fitted on our own benches). When the config does not fit it proposes the cheapest change that
does: lossless changes first (checkpointing mode, activation offload, block swap; the one with the
fastest estimated step wins), then fp8 base weights, then fewer frames. No weights are loaded and nothing here needs
a GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from engine.config import TrainConfig
from engine.planner_estimate import GIB, DeviceSet, Estimate, Workload, estimate, memory_cap_gib, workload_for
from engine.planner_rates import MEMORY
from engine.planner_shapes import Clip, ModelShape

logger = logging.getLogger(__name__)

__all__ = ["DeviceSet", "Workload", "Estimate", "Suggestion", "Plan", "plan_training", "estimate", "suggest",
           "advice_after_oom", "duration_text"]


# ---- fitting: the cheapest change ---------------------------------------------------------------------
@dataclass
class Suggestion:
    changes: dict[str, Any]  # key path -> value
    text: str
    estimate: Estimate
    lossless: bool

    def as_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "text": self.text, "lossless": self.lossless,
                "estimate": self.estimate.as_dict()}


@dataclass
class Plan:
    device: DeviceSet
    clip: Clip
    tokens: int
    model_params: int
    estimate: Estimate
    suggestion: Suggestion | None

    @property
    def fits(self) -> bool:
        return self.estimate.fits

    def as_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "clip": str(self.clip), "tokens": self.tokens,
                "model_params": self.model_params, "fits": self.fits, "estimate": self.estimate.as_dict(),
                "suggestion": self.suggestion.as_dict() if self.suggestion else None, "summary": self.summary()}

    def summary(self) -> list[str]:
        e = self.estimate
        where = "GPU" if self.device.kind == "gpu" else "host RAM"
        peak = e.gpu_peak_gib if self.device.kind == "gpu" else e.host_ram_gib
        lines = [f"{'fits' if e.fits else 'does not fit'}: {where} peak ~{peak:.1f} GiB of {e.memory_gib:.1f} GiB usable "
                 f"on {self.device} (largest clip {self.clip}, {self.tokens:,} tokens)",
                 f"~{e.s_per_step:.2f} s/step at that clip" + (f", ~{duration_text(e.total_s)} for {e.steps} steps"
                                                                if e.total_s is not None else "")]
        if self.device.kind == "gpu":
            lines.append(f"host RAM ~{e.host_ram_gib:.1f} GiB")
        if e.cache_gib is not None:
            lines.append(f"latent/text cache ~{e.cache_gib * 1024:.0f} MiB on disk")
        if self.suggestion:
            lines.append(f"to fit: {self.suggestion.text}")
        elif not e.fits:
            lines.append("no single change found that fits: use a larger card or a smaller resolution")
        return lines + e.notes


def duration_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _candidates(cfg: TrainConfig, shape: ModelShape, frames: list[int]) -> list[tuple[dict[str, Any], bool, int | None]]:
    """(changes, lossless, frame cap) in the order tried; the fastest fitting lossless one wins."""
    saved_attention = {"activation_checkpointing": True, "performance.checkpointing": "save_attention"}
    full = {"activation_checkpointing": True, "performance.checkpointing": "full"}
    offload = {"activation_checkpointing": True, "performance.checkpointing": "offload"}
    out: list[tuple[dict[str, Any], bool, int | None]] = []

    def with_swaps(changes: dict[str, Any], lossless: bool, cap: int | None = None) -> None:
        out.extend([(changes, lossless, cap)] + [({**changes, "blocks_to_swap": n}, lossless, cap)
                                                 for n in range(1, shape.layers + 1)])

    if not cfg.activation_checkpointing:
        out.append((saved_attention, True, None))
    with_swaps(full, True)
    with_swaps(offload, True)
    with_swaps({**full, "model.transformer_dtype": "float8"}, False)
    with_swaps({**offload, "model.transformer_dtype": "float8"}, False)
    for cap in frames:
        with_swaps(full, False, cap)
        with_swaps(offload, False, cap)
    return out


def _apply(cfg: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    for path, value in changes.items():
        cfg = cfg.with_value(path, value)
    return cfg


def _describe(changes: dict[str, Any], cfg: TrainConfig, cap: int | None) -> str:
    parts = [f"{path} = {value!r}".replace("'", '"') for path, value in changes.items()
             if cfg.get(path) != value]
    if cap is not None:
        parts.append(f"frame buckets up to {cap} (dataset.frame_buckets)")
    return ", ".join(parts) or "no change"


def suggest(cfg: TrainConfig, shape: ModelShape, devices: DeviceSet, work: Workload) -> Suggestion | None:
    """The cheapest change that fits: the fastest lossless one, else fp8, else fewer frames."""
    frames = [f for f in (65, 49, 33, 17, 9, 5, 1) if f < work.largest.frames]
    lossy_found: Suggestion | None = None
    best: Suggestion | None = None
    for changes, lossless, cap in _candidates(cfg, shape, frames):
        if not lossless and best is not None:
            break
        changed = _apply(cfg, changes)
        if changed.blocks_to_swap and devices.kind == "cpu":
            continue
        result = estimate(changed, shape, devices, work.capped(cap) if cap else work)
        if not result.fits:
            continue
        found = Suggestion({k: v for k, v in changes.items() if cfg.get(k) != v}, "", result, lossless)
        if cap is not None:
            found.changes["dataset.frame_buckets"] = sorted({f for f in cfg.dataset.frame_buckets if f < cap} | {cap})
        slower = result.s_per_step / max(estimate(cfg, shape, devices, work).s_per_step, 1e-9) - 1
        found.text = (f"{_describe(changes, cfg, cap)}: ~{result.gpu_peak_gib if devices.kind == 'gpu' else result.host_ram_gib:.1f} GiB, "
                      f"~{result.s_per_step:.2f} s/step ({slower:+.0%})")
        if lossless:
            if best is None or result.s_per_step < best.estimate.s_per_step:
                best = found
        elif lossy_found is None:
            lossy_found = found
            break
    return best or lossy_found


def plan_training(cfg: TrainConfig, devices: DeviceSet, shape: ModelShape | None = None,
                  read_files: bool = True) -> Plan:
    """The plan for `cfg` on `devices`; `shape` defaults to the model folder's (config files only)."""
    if shape is None:
        from engine.models import resolve_model

        model_dir = resolve_model(cfg.model.ckpt_path)
        shape = ModelShape.from_model_dir(model_dir, cfg.model.transformer_path or cfg.model.transformer_subfolder)
    work = workload_for(cfg, shape, devices.count, read_files)
    result = estimate(cfg, shape, devices, work)
    suggestion = None if result.fits else suggest(cfg, shape, devices, work)
    if work.source == "config":
        result.notes.append("dataset not read: planned for the largest bucket the config allows (no cache size "
                            "or total time without max_steps)")
    return Plan(devices, work.largest, shape.tokens(work.largest), shape.params, result, suggestion)


OOM_ADVICE_PREFIX = "planner suggests: "


def advice_after_oom(cfg: TrainConfig, error: BaseException, world: int) -> str:
    """For a CUDA out-of-memory error: a line naming the planner's cheapest change for this card
    ("" for other errors or when no change helps). When the plan said "fits", the estimate was too
    low for this run: the change asked for is one that fits 85% of the estimate."""
    import torch

    if "out of memory" not in str(error).lower() or not torch.cuda.is_available():
        return ""
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        devices = DeviceSet.gpus(props.name, memory_cap_gib() or props.total_memory / GIB, world)
        plan = plan_training(cfg, devices)
        if plan.fits:
            tighter = replace(devices, memory_gib=0.85 * plan.estimate.gpu_peak_gib + MEMORY.reserve_gib)
            plan = plan_training(cfg, tighter)
    except Exception as exc:  # noqa: BLE001 - advice must never hide the error itself
        logger.warning("planner advice after OOM failed: %s", exc)
        return ""
    return f"\n{OOM_ADVICE_PREFIX}{plan.suggestion.text}" if plan.suggestion else ""
