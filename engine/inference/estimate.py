"""How long a generation takes on CPU, estimated before it starts, so a long one says so.

Counted from the transformer's shape (engine.planner_shapes: tokens from the model's own VAE stride
and patch) with the training planner's per-block FLOPs and its CPU rate (engine.planner_rates), one
forward per step, two with classifier-free guidance (guidance_scale > 1, as diffusers' Wan pipeline
does), plus a fixed cost per forward and a decode cost per output pixel. The fixed and decode costs
are fitted on the demo model (bench/RESULTS.md "Inference on CPU", the worker's warm request at
17:35 UTC: denoise 2.30 s for 40 forwards, decode 2.18 s for 64x64x17, text encode + mp4 0.44 s).
Real Wan VAEs are wider than the demo's, so for them the decode part is a floor. The result is a
band: the CPU row's measured/planned spread (CPU_RATES.time_band).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.inference.request import InferRequest
from engine.planner import duration_text
from engine.planner_estimate import block_forward_flops
from engine.planner_rates import CPU_RATES
from engine.planner_shapes import Clip, ModelShape

__all__ = ["CpuEstimate", "cpu_estimate", "cpu_warning", "long_request_warning", "WARN_AFTER_S"]

WARN_AFTER_S = 120.0  # a CPU request estimated longer than this says so before it starts
# demo: 2.30 s for 40 forwards of 1.9 GFLOP each; what the CPU rate does not explain is a forward's fixed cost
FORWARD_FIXED_S = 2.30 / 40 - 1.9e9 / (CPU_RATES.gemm_tflops * 1e12)
DECODE_S_PER_PIXEL = 2.18 / (64 * 64 * 17)  # demo VAE decode, per output pixel
PER_VIDEO_S = 0.44  # demo: text encode, mp4, display copy and poster


@dataclass(frozen=True)
class CpuEstimate:
    seconds: float
    low_s: float
    high_s: float

    def __str__(self) -> str:
        return f"about {duration_text(self.seconds)} ({duration_text(self.low_s)} to {duration_text(self.high_s)})"


def cpu_estimate(shape: ModelShape, req: InferRequest) -> CpuEstimate:
    clip = Clip(width=req.width, height=req.height, frames=req.num_frames)
    f_lin, f_att = block_forward_flops(shape, clip)
    flop_s = shape.layers * (f_lin / (CPU_RATES.gemm_tflops * 1e12)
                             + f_att / (CPU_RATES.attention_tflops["default"] * 1e12))
    forwards = req.steps * (2 if req.guidance_scale > 1.0 else 1)
    video_s = (forwards * (flop_s + FORWARD_FIXED_S) + req.width * req.height * req.num_frames * DECODE_S_PER_PIXEL
               + PER_VIDEO_S)
    seconds = video_s * req.num_videos
    low, high = CPU_RATES.time_band or (1.0, 1.0)
    return CpuEstimate(seconds=seconds, low_s=seconds * low, high_s=seconds * high)


def cpu_warning(model_path: Path, req: InferRequest, threshold_s: float = WARN_AFTER_S) -> str | None:
    """The warning a CPU request shows before it starts, or None when it is quick (or the model's
    config cannot be read: the request's own checks report that)."""
    try:
        shape = ModelShape.from_model_dir(Path(model_path))
    except (OSError, ValueError, KeyError):
        return None
    return long_request_warning(shape, req, threshold_s)


def long_request_warning(shape: ModelShape, req: InferRequest, threshold_s: float = WARN_AFTER_S) -> str | None:
    """`cpu_warning` for a model shape already known."""
    estimate = cpu_estimate(shape, req)
    if estimate.seconds <= threshold_s:
        return None
    return (f"this runs on CPU and is estimated at {estimate} for {req.width}x{req.height}x{req.num_frames}, "
            f"{req.steps} steps; a GPU, fewer frames or steps, or a smaller size is much quicker")

