"""GPU bench: LoRA training steps on random-weight Wan2.1 transformers of real shape.

Prints one JSON line per case: card, s/step, MFU (REFERENCE.md counting, recompute not counted),
peak GiB, and the ratio to the plain baseline measured in the same process.

A case is written `LOOP[+key=value|+flag...]`:
  LOOP      plain   - diffusers + peft + torch AdamW, the baseline users would write
            trainer - the studio's trainer code path (engine.trainer, DeepSpeed engine)
  attn=     default | cudnn | flash | efficient | flash3 (engine.families.wan_perf)
  ckpt=     full | attn (save self-attention outputs) | off
  compile   compile the transformer blocks
  lora=     fp32 | bf16 | act   LoRA weights fp32 (as diffusers' scripts) | bf16 weights and bf16
            AdamW (what adapter.dtype = "bfloat16" does) | fp32 weights, bf16 matmuls
            (performance.lora_compute_dtype = "activation")
The first case of a run is the baseline for the ratios (put `plain` first).

  python bench/train_step.py --preset 1.3B --frames 81 --cases plain,plain+attn=cudnn+ckpt=attn+compile
  python bench/train_step.py --attention-micro     # each attention kernel alone at the real shape
  python bench/train_step.py --attention-equivalence   # FA3 vs cuDNN: one whole training step
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import (  # noqa: E402
    PEAK_BF16_FLOPS,
    card_name,
    emit,
    free_cuda,
    git_commit,
    lora_step_flops,
    mfu,
    peak_gib,
    real_shape_transformer,
    time_steps,
    video_tokens,
)
from engine.families.wan_perf import PerfOptions, apply, reset_attention_backend  # noqa: E402

LORA_RANK = 32
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
TEXT_DIM = 4096


@dataclass
class Case:
    spec: str
    loop: str = "plain"
    attn: str = "default"
    ckpt: str = "full"
    compile: bool = False
    lora_dtype: str = "fp32"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def perf(self) -> PerfOptions:
        return PerfOptions(
            attention_backend=self.attn,  # type: ignore[arg-type]
            compile_blocks=self.compile,
            checkpointing="save_attention" if self.ckpt == "attn" else "full",
            lora_compute_dtype="activation" if self.lora_dtype == "act" else "adapter",
        )

    @property
    def lora_param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.lora_dtype == "bf16" else torch.float32

    @property
    def options_key(self) -> str:
        """The spec without its loop: the plain and trainer cases with the same options share it."""
        return self.spec.partition("+")[2]


def parse_case(spec: str) -> Case:
    parts = spec.strip().split("+")
    case = Case(spec=spec.strip(), loop=parts[0])
    if case.loop not in ("plain", "trainer"):
        raise ValueError(f"{spec}: loop must be plain or trainer")
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key == "compile":
            case.compile = True
        elif key == "attn":
            case.attn = value
        elif key == "ckpt":
            if value not in ("full", "attn", "off"):
                raise ValueError(f"{spec}: ckpt must be full, attn or off")
            case.ckpt = value
        elif key == "lora":
            if value not in ("fp32", "bf16", "act"):
                raise ValueError(f"{spec}: lora must be fp32, bf16 or act")
            case.lora_dtype = value
        else:
            case.extra[key] = value
    case.perf  # validates attn
    return case


# ---- inputs -----------------------------------------------------------------------------------
@dataclass
class Batch:
    latents: torch.Tensor  # [1, 16, f, h, w] fp32 (as cached latents)
    text: torch.Tensor  # [1, 512, 4096] bf16


def make_batch(height: int, width: int, frames: int, device: str = "cuda") -> Batch:
    g = torch.Generator(device=device).manual_seed(1)
    f = (frames - 1) // 4 + 1
    latents = torch.randn(1, 16, f, height // 8, width // 8, generator=g, device=device)
    text = torch.randn(1, 512, TEXT_DIM, generator=g, device=device).to(torch.bfloat16)
    return Batch(latents, text)


def flow_matching_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The studio's objective: velocity (noise - x0) at logit-normal t."""
    x0 = batch.latents
    noise = torch.randn_like(x0)
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    tt = t.view(-1, 1, 1, 1, 1)
    noisy = ((1 - tt) * x0 + tt * noise).to(torch.bfloat16)
    pred = model(hidden_states=noisy, timestep=t * 1000.0, encoder_hidden_states=batch.text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


# ---- the plain baseline loop ---------------------------------------------------------------------
def add_lora(model: torch.nn.Module, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=True,
                                 target_modules=list(LORA_TARGETS)))
    params = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
            # B = 0 at init would make A's gradient exactly zero; real runs leave init quickly.
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
            params.append(p)
    return params


def plain_step_fn(case: Case, preset: str, batch: Batch) -> tuple[Callable[[], float], dict[str, Any]]:
    model = real_shape_transformer(preset)
    params = add_lora(model, case.lora_param_dtype)
    applied = apply(model, case.perf, activation_checkpointing=case.ckpt != "off")
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01)

    def step() -> float:
        loss = flow_matching_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    info = {"applied": applied.__dict__, "lora_params": sum(p.numel() for p in params)}
    return step, info


# ---- the studio's trainer path -------------------------------------------------------------------
def trainer_step_fn(case: Case, preset: str, batch: Batch) -> tuple[Callable[[], float], dict[str, Any]]:
    """The studio trainer's own model + DeepSpeed setup and step, fed the bench batch."""
    from bench import trainer_path  # written against engine.trainer once it exists

    return trainer_path.build_step(case, preset, batch)


# ---- one case ---------------------------------------------------------------------------------
def run_case(case: Case, args: argparse.Namespace, baseline: dict[str, float]) -> dict[str, Any]:
    free_cuda()
    reset_attention_backend()
    torch._dynamo.reset()
    tokens = video_tokens(args.height, args.width, args.frames)
    record: dict[str, Any] = {
        "bench": "train_step", "case": case.spec, "preset": args.preset,
        "clip": f"{args.height}x{args.width}x{args.frames}", "tokens": tokens,
        "card": card_name(), "commit": args.commit, "date": time.strftime("%Y-%m-%d"),
        "world_size": getattr(args, "world_size", 1),
    }
    try:
        batch = make_batch(args.height, args.width, args.frames)
        t0 = time.perf_counter()
        builder = plain_step_fn if case.loop == "plain" else trainer_step_fn
        step, info = builder(case, args.preset, batch)
        record["setup_s"] = round(time.perf_counter() - t0, 1)
        timing, warm_s = time_steps(step, args.warmup, args.steps)
        s = timing.median
        flops = lora_step_flops(args.preset, tokens)
        record.update(
            s_per_step=round(s, 4), spread_s=round(timing.spread, 4), warmup_s=round(warm_s, 1),
            mfu=round(mfu(flops, s), 4), tflops_useful=round(flops / s / 1e12, 1),
            peak_gib=round(peak_gib(), 2), steps=args.steps, **info,
        )
        loss = float(step())
        record["loss_finite"] = math.isfinite(loss)
        if "s" in baseline:
            record["speedup_vs_baseline"] = round(baseline["s"] / s, 3)
        else:
            baseline["s"] = s
            record["baseline"] = True
        plain_key = "plain:" + case.options_key
        if case.loop == "plain":
            baseline[plain_key] = s
        elif plain_key in baseline:
            record["overhead_vs_plain_same_options"] = round(s / baseline[plain_key] - 1, 4)
        if args.profile:
            record["profile_ms"] = profile_step(step)
    except Exception as exc:  # one failing case must not lose the others
        record["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        record["trace"] = traceback.format_exc()[-1500:]
        if isinstance(exc, torch.OutOfMemoryError):
            record["peak_gib"] = round(peak_gib(), 2)
    finally:
        step = None  # noqa: F841 - drop the model before the next case
        torch._dynamo.reset()
        free_cuda()
    return record


# ---- where the time goes -------------------------------------------------------------------------
_KERNEL_GROUPS = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_")),
    ("triton_fused", ("triton",)),
    ("copy_cast", ("copy", "cast", "convert")),
    ("elementwise_reduce", ("elementwise", "vectorized", "reduce", "norm", "unrolled")),
)


def profile_step(step: Callable[[], Any]) -> dict[str, float]:
    """GPU kernel time of one step by kind (ms), plus the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    groups: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        name = evt.key.lower()
        group = next((g for g, keys in _KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + us / 1e3
        top.append((us / 1e3, evt.key[:90]))
    out = {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    out["gpu_total"] = round(sum(groups.values()), 1)
    out["wall"] = round(wall * 1e3, 1)
    out["top"] = [f"{ms:.1f} {name}" for ms, name in sorted(top, reverse=True)[:8]]  # type: ignore[assignment]
    return out


# ---- attention micro-bench ------------------------------------------------------------------------
def _attention_fn(name: str, backend: Any) -> Callable[..., torch.Tensor]:
    """attention(q, k, v) on (batch, heads, seq, dim) tensors with one kernel: an SDPA backend, or
    FlashAttention-3 through the diffusers op the trainer uses (with the studio's backward)."""
    if name == "flash3":
        from engine.families import flash3

        reason = flash3.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        flash3.complete_op()
        op = getattr(getattr(torch.ops, flash3.OP_NAMESPACE), flash3.OP_BASENAME)

        def fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out, _ = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        return fa3

    from torch.nn.attention import sdpa_kernel

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return sdpa


def attention_micro(args: argparse.Namespace) -> None:
    """fwd and fwd+bwd TFLOP/s of each attention kernel at a Wan self-attention shape, plus a
    correctness check of each against fp32 math attention at a smaller length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, hd = (12, 128) if args.preset == "1.3B" else (40, 128)
    tokens = video_tokens(args.height, args.width, args.frames)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash3": None}
    # Correctness at 4096 tokens against fp32 math.
    g = torch.Generator(device="cuda").manual_seed(3)
    small = [torch.randn(1, heads, 4096, hd, generator=g, device="cuda") for _ in range(3)]
    grad_out = torch.randn(1, heads, 4096, hd, generator=g, device="cuda")
    ref_in = [x.double().requires_grad_(True) for x in small]
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_in)
    ref.backward(grad_out.double())
    for name, backend in backends.items():
        rec: dict[str, Any] = {"bench": "attention_micro", "backend": name, "card": card_name(),
                               "tokens": tokens, "heads": heads, "commit": args.commit}
        try:
            attend = _attention_fn(name, backend)
            xs = [x.bfloat16().requires_grad_(True) for x in small]
            out = attend(*xs)
            out.backward(grad_out.bfloat16())
            rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
            rec["rel_err_out"] = round(rel(out, ref), 5)
            rec["rel_err_dq"] = round(rel(xs[0].grad, ref_in[0].grad), 5)
            rec["rel_err_dk"] = round(rel(xs[1].grad, ref_in[1].grad), 5)
            rec["rel_err_dv"] = round(rel(xs[2].grad, ref_in[2].grad), 5)
            q, k, v = (torch.randn(1, tokens, heads, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                       .requires_grad_(True) for _ in range(3))
            go = torch.randn_like(q)
            fwd_flops = 4 * tokens * tokens * heads * hd

            def fwd() -> None:
                with torch.no_grad():
                    attend(q, k, v)

            def fwd_bwd() -> None:
                attend(q, k, v).backward(go)

            tf, _ = time_steps(fwd, 2, 5)
            tb, _ = time_steps(fwd_bwd, 2, 5)
            rec["fwd_ms"] = round(tf.median * 1e3, 2)
            rec["fwd_tflops"] = round(fwd_flops / tf.median / 1e12, 1)
            rec["fwd_bwd_ms"] = round(tb.median * 1e3, 2)
            rec["fwd_bwd_tflops"] = round(3.5 * fwd_flops / tb.median / 1e12, 1)  # bwd = 2.5x fwd matmuls
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        emit(rec, args.out)
        free_cuda()
    # The matrix ceiling on this card, for scale.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm, _ = time_steps(lambda: a @ b, 3, 10)
    emit({"bench": "matmul_ceiling", "card": card_name(), "tflops": round(2 * 8192**3 / tm.median / 1e12, 1),
          "peak_assumed_tflops": PEAK_BF16_FLOPS / 1e12}, args.out)


# ---- kernel equivalence on the whole model --------------------------------------------------------
def attention_equivalence(args: argparse.Namespace) -> None:
    """One training step of the same model, batch and noise with each attention kernel under the fast
    options (save_attention checkpointing, compiled blocks, bf16 LoRA matmuls): loss and LoRA
    gradients of FlashAttention-3 against cuDNN, and of FlashAttention-2 against cuDNN for scale (two
    correct kernels differ by their bf16 rounding). Exercises what the trainer runs: the FA3 op's
    backward and shape function, selective checkpointing that keeps its output, and compilation."""
    batch = make_batch(args.height, args.width, args.frames)
    results: dict[str, tuple[float, torch.Tensor]] = {}
    record: dict[str, Any] = {"bench": "attention_equivalence", "preset": args.preset, "card": card_name(),
                              "clip": f"{args.height}x{args.width}x{args.frames}", "commit": args.commit}
    for kernel in ("cudnn", "flash", "flash3"):
        free_cuda()
        reset_attention_backend()
        torch._dynamo.reset()
        model = real_shape_transformer(args.preset)
        torch.manual_seed(0)
        params = add_lora(model, torch.float32)
        perf = PerfOptions(attention_backend=kernel, compile_blocks=True, checkpointing="save_attention",
                           lora_compute_dtype="activation")  # type: ignore[arg-type]
        record[f"{kernel}_applied"] = apply(model, perf, activation_checkpointing=True).attention_backend
        model.train()
        torch.manual_seed(1)  # the same noise and timestep for both kernels
        loss = flow_matching_loss(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in params])
        results[kernel] = (float(loss), grads)
        del model, params
    loss_ref, g_ref = results["cudnn"]
    record["loss_cudnn"] = round(loss_ref, 6)
    for kernel in ("flash", "flash3"):
        loss, grads = results[kernel]
        record[f"{kernel}_vs_cudnn"] = {
            "loss": round(loss, 6), "loss_rel_diff": abs(loss - loss_ref) / abs(loss_ref),
            "lora_grad_rel_diff": float((grads - g_ref).norm() / g_ref.norm()),
            "lora_grad_cosine": float(torch.nn.functional.cosine_similarity(grads, g_ref, dim=0))}
    emit(record, args.out)
    reset_attention_backend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1.3B", choices=["1.3B", "14B"])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--cases", default="plain")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    p.add_argument("--attention-micro", action="store_true")
    p.add_argument("--attention-equivalence", action="store_true",
                   help="one step with FlashAttention-3 against cuDNN: loss and LoRA gradients")
    p.add_argument("--profile", action="store_true", help="add GPU time by kernel kind for one step")
    args = p.parse_args(argv)
    args.commit = os.environ.get("BENCH_COMMIT") or git_commit()
    if not torch.cuda.is_available():
        emit({"bench": "train_step", "error": "no CUDA device"}, args.out)
        return 1
    # Under torchrun / the deepspeed launcher every rank runs the same cases; rank 0 reports.
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    is_main = int(os.environ.get("RANK", "0")) == 0
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.attention_micro:
        attention_micro(args)
        return 0
    if args.attention_equivalence:
        attention_equivalence(args)
        return 0
    baseline: dict[str, float] = {}  # "s": the first case; "plain:<options>": plain cases
    failures = 0
    for spec in args.cases.split(","):
        case = parse_case(spec)
        if args.world_size > 1 and case.loop != "trainer":
            raise SystemExit(f"{spec}: only trainer cases run on several ranks")
        record = run_case(case, args, baseline)
        failures += "error" in record
        if is_main:
            emit(record, args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
