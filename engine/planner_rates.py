"""The planner's measured constants: per-card throughput and the activation-memory model.

Every number says where it comes from. "measured" rows were fitted on our own benches
(bench/RESULTS.md, /REFERENCE "Measured here"); rows for cards we never ran on are scaled from the
H100 row by the vendor's dense bf16 peak and say so, so the planner can mark their times unmeasured.

How the H100 row was fitted (trainer, random-weight Wan2.1-1.3B, 480x832x81, T = 32,760 tokens,
profiled step of `bench/train_step.py --profile`, one H100, 2026-11-26, third session):
- attention: FA3 1,168 ms of GPU time for 30 blocks x 3 F_att (the MFU count: forward + a 2x
  backward) -> 516 TFLOP/s "effective"; cuDNN from the trainer + cudnn + B step (2.016 s) minus its
  GEMM, elementwise and host parts -> 442.
- GEMMs 426 ms for 30 x 3 F_lin (forward, input-gradient backward, one recompute) -> 577 TFLOP/s.
- Triton-fused elementwise 205 ms = 0.136 ns per (token x width x block); uncompiled 0.51 ns (the
  H200 reference: compiled blocks saved 0.54 s of 2.87 s with full checkpointing).
- fp32 LoRA matmuls (lora_compute_dtype = "adapter"): what the plain loop's 3.463 s leaves after the
  parts above, 0.0184 ns per (token x LoRA input width x block).
- host: 20 ms a step (profiled).
"""
from __future__ import annotations

from pydantic import Field

from engine.config_types import ConfigTable, Float, Str

__all__ = ["CardRates", "MemoryModel", "CARDS", "CPU_RATES", "MEMORY", "card_for_name"]


class CardRates(ConfigTable):
    name: Str = Field(description="Card name as shown to the user.")
    match: list[Str] = Field(description="Lower-case substrings of nvidia-smi's name that mean this card.")
    memory_gib: Float = Field(description="Memory of the card (the usual model).")
    peak_tflops: Float = Field(description="Dense bf16 peak (vendor spec).")
    attention_tflops: dict[Str, Float] = Field(description="Effective attention TFLOP/s (3 F_att per block) by kernel.")
    gemm_tflops: Float = Field(description="Effective TFLOP/s of the frozen linears.")
    elementwise_ns: Float = Field(description="ns per token x width x block, compiled blocks.")
    elementwise_uncompiled_ns: Float = Field(description="ns per token x width x block, eager.")
    fp32_lora_ns: Float = Field(description="ns per token x LoRA input width x block, fp32 LoRA matmuls.")
    host_s: Float = Field(description="Host time a step (data, logging, syncs).")
    h2d_gb_s: Float = Field(description="Pinned host-to-device copy bandwidth (block swap).")
    hopper: bool = Field(False, description="FlashAttention-3 runs here.")
    measured: bool = Field(False, description="Times fitted on this card (else scaled from the H100 by peak).")
    time_band: list[Float] | None = Field(
        None, description="Where measured step times fell against the estimate (low, high factors), when they "
                          "swing more than the estimate's own error: shown with every time planned on this device.")
    source: Str = Field(description="Where the numbers come from.")


class MemoryModel(ConfigTable):
    """Peak allocated GPU memory of a training step = weights + LoRA state + activations.

    Activation bytes per token of one block, working set (forward + backward of one block, the
    part that is not kept): x * width + y * ffn width. Fitted on the plain loop's full-checkpointing
    peaks (REFERENCE "Measured here", one H200: 1.3B 480x832x33 6.9 GiB and 480x832x81 11.7 GiB,
    14B 480x832x81 54.7 GiB); checked against the trainer's numbers in bench/RESULTS.md.
    """

    working_per_width: Float = Field(55.6, description="Bytes per token per unit of width (one block's working set).")
    working_per_ffn: Float = Field(10.9, description="Bytes per token per unit of FFN width.")
    kept_fraction_no_checkpointing: Float = Field(
        0.55, description="Without checkpointing each block keeps this share of its working set "
                          "(1.3B 480x832x33: 45.4 GiB peak).")
    lora_fp32_input_per_width: Float = Field(
        17.5, description="Bytes per token per unit of width of the working set that are fp32 copies of LoRA inputs "
                          "(adapter.dtype float32 with lora_compute_dtype 'adapter': peft casts each input and keeps "
                          "it). Measured on CPU: the saved-tensor bytes of one block in the two modes, Wan2.1-1.3B and "
                          "14B shapes, solved for width and FFN width (bench/RESULTS.md 'Planner').")
    lora_fp32_input_per_ffn: Float = Field(2.0, description="The same per unit of FFN width.")
    working_factor: dict[Str, Float] = Field(
        {"full": 1.0, "full+compiled": 0.78, "save_attention": 0.93, "save_attention+compiled": 1.18,
         "off": 1.0, "off+compiled": 0.78},
        description="One block's working set, less the fp32 LoRA input copies, against full checkpointing, eager. "
                    "full+compiled: the plain loop's 10.5 GiB compiled vs 11.7 eager (1.3B 81f, H200); "
                    "save_attention: the studio job's 13.0 GiB (848x480x81, eager, bf16 LoRA matmuls, H200, GPU "
                    "acceptance); save_attention+compiled: the trainer's 13.88 GiB (1.3B 480x832x81, bf16 LoRA "
                    "matmuls, H100); off+compiled: assumed like full+compiled. 'offload' uses 'full'.")
    save_attention_bytes_per_token_width: Float = Field(
        2.0, description="save_attention keeps each block's self-attention output (bf16).")
    reserve_gib: Float = Field(
        1.5, description="CUDA context and allocator slack that max_memory_allocated does not count.")
    process_host_gib: Float = Field(
        2.5, description="Host RAM of one trainer process on a GPU (CUDA, torch, DeepSpeed): assumed, not measured.")
    process_host_gib_cpu: Float = Field(
        0.5, description="Host RAM of one trainer process on CPU besides model and activations (demo LoRA, "
                         "peak RSS of the process tree, bench/planner_check.py --cpu-run).")
    source: Str = "bench/RESULTS.md and /REFERENCE 'Measured here' (see each field)"


MEMORY = MemoryModel()

_H100_ATTENTION = {"flash3": 516.0, "cudnn": 442.0, "flash": 266.0, "efficient": 105.0}


def _scaled(name: str, match: list[str], memory_gib: float, peak: float, h2d: float) -> CardRates:
    """A card we never measured: the H100's fitted rates times the ratio of dense bf16 peaks.
    Without Hopper, 'default' attention is PyTorch's FlashAttention-2 order (the 'flash' rate)."""
    k = peak / 989.0
    attention = {key: v * k for key, v in _H100_ATTENTION.items() if key != "flash3"}
    return CardRates(name=name, match=match, memory_gib=memory_gib, peak_tflops=peak, attention_tflops=attention,
                     gemm_tflops=577.0 * k, elementwise_ns=0.136 / k, elementwise_uncompiled_ns=0.51 / k,
                     fp32_lora_ns=0.0184 / k, host_s=0.02, h2d_gb_s=h2d, measured=False,
                     source=f"not measured: H100 rates x {k:.3f} (dense bf16 peak {peak:g} vs 989 TFLOP/s, vendor spec)")


CARDS: tuple[CardRates, ...] = (
    CardRates(name="H100 80GB", match=["h100"], memory_gib=79.6, peak_tflops=989.0,
              attention_tflops=_H100_ATTENTION, gemm_tflops=577.0, elementwise_ns=0.136,
              elementwise_uncompiled_ns=0.51, fp32_lora_ns=0.0184, host_s=0.02, h2d_gb_s=25.0,
              hopper=True, measured=True,
              source="bench/RESULTS.md 2026-11-26 third session, one H100 80GB HBM3 (profiled 1.3B 480x832x81 "
                     "step; flash-attention micro bench for 'flash'/'efficient'); h2d_gb_s assumed, not measured"),
    # The H200 ran the same step 4.4% faster (1.756 s vs 1.833 s, flash3 + B): HBM3e bandwidth.
    CardRates(name="H200", match=["h200"], memory_gib=139.8, peak_tflops=989.0,
              attention_tflops={k: v * 1.044 for k, v in _H100_ATTENTION.items()}, gemm_tflops=577.0 * 1.044,
              elementwise_ns=0.136 / 1.044, elementwise_uncompiled_ns=0.51 / 1.044, fp32_lora_ns=0.0184 / 1.044,
              host_s=0.02, h2d_gb_s=25.0, hopper=True, measured=True,
              source="H100 rates x 1.044: bench/RESULTS.md, trainer + flash3 + B 1.756 s (H200) vs 1.833 s (H100)"),
    _scaled("A100 80GB", ["a100"], 79.2, 312.0, 20.0),
    _scaled("L40S", ["l40s"], 44.5, 362.0, 20.0),
    _scaled("RTX 4090", ["4090"], 23.5, 165.0, 20.0),
    _scaled("RTX 3090", ["3090"], 23.5, 71.0, 20.0),
    _scaled("RTX A6000", ["a6000"], 47.5, 155.0, 20.0),
)

# The CPU "card": the demo LoRA (64x64, 17 and 9 frames, batch 1 and 4) on the shared 2-core x86_64 dev
# machine, fitted by `bench/planner_check.py --cpu-run` on two quiet runs (bench/RESULTS.md "Planner"):
# s/step = host_s + the FLOP-and-elementwise terms at these rates (attention and linears share one rate).
# Only the demo model was measured. The band: how far runs with other work on the machine strayed.
CPU_RATES = CardRates(
    name="CPU", match=[], memory_gib=0.0, peak_tflops=0.041,
    attention_tflops={"default": 0.041, "cudnn": 0.041, "flash": 0.041, "efficient": 0.041, "flash3": 0.041},
    gemm_tflops=0.041, elementwise_ns=4.9, elementwise_uncompiled_ns=4.9, fp32_lora_ns=0.0, host_s=0.03,
    h2d_gb_s=0.0, measured=True, time_band=[0.8, 2.1],
    source="demo LoRA on the 2-core x86_64 dev machine, two quiet runs (bench/RESULTS.md 'Planner'); the band: "
           "measured/planned of the runs with other work on the machine (load 3-4 on 2 cores) and the quiet ones")


def card_for_name(name: str) -> CardRates | None:
    """The table row for an nvidia-smi name ('NVIDIA H100 80GB HBM3'), or None when unknown."""
    lowered = name.lower()
    for card in CARDS:
        if any(m in lowered for m in card.match):
            return card
    return None
