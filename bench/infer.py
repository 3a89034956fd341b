"""Inference bench: the studio's warm worker against a plain diffusers `WanPipeline` call, same run.

    python bench/infer.py                 # CPU, the demo model at its own settings (64x64x17, 20 steps),
                                          # the worker path against `python -m studio demo --generate`
    python bench/infer.py --gpu           # GPU, random-weight Wan2.1-1.3B shape, 480x832x81, 50 steps, CFG
    python bench/infer.py --gpu --variants compile compile+cache:0.05

Measures seconds per video (end to end through the service, and its denoise/decode/encode parts),
model load time on the first vs the second request, LoRA load and LoRA switch time, and the plain
diffusers call (load + generate) on the same model and settings. Each variant is a worker with other
speed options (engine/inference/speed.py): `exact` (defaults), `compile` (compiled blocks, same
output), `flash3` (FlashAttention-3, Hopper), `cache:T` (First Block Cache, threshold T: changes
outputs), joined with '+' (`flash3+compile`). On the GPU
a variant first runs a 2-step warm-up request (load + compile), then the full video. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # first, always: bench/engine.py must not shadow the engine package

import torch  # noqa: E402

from engine.inference.random_lora import random_lora  # noqa: E402
from engine.inference.request import DEMO_DEFAULTS, InferRequest, LoraSpec  # noqa: E402
from engine.demo import world  # noqa: E402
from engine.inference.speed import InferenceSpeed  # noqa: E402
from engine.threads import apply_thread_policy, cpu_threads  # noqa: E402

GPU_DEFAULTS = dict(width=832, height=480, frames=81, steps=50, guidance=5.0, lora_rank=32)
# The demo's own settings (what the Infer tab sends and `demo --generate` uses).
CPU_DEFAULTS = dict(width=DEMO_DEFAULTS["width"], height=DEMO_DEFAULTS["height"], frames=DEMO_DEFAULTS["num_frames"],
                    steps=DEMO_DEFAULTS["steps"], guidance=DEMO_DEFAULTS["guidance_scale"], lora_rank=4)
CPU_PROMPT = "a red circle moving left on a black background"


# ---- models --------------------------------------------------------------------------------------


def cpu_model(workdir: Path) -> tuple[Path, str]:
    from engine.families.wan_random import build_random_wan
    from engine.models import ModelNotFoundError, resolve_model

    try:
        return resolve_model("demo"), "demo"
    except ModelNotFoundError:
        return build_random_wan(workdir / "tiny", preset="tiny"), "random tiny Wan (demo model missing)"


def gpu_model(workdir: Path) -> tuple[Path, str]:
    from engine.families.wan_random import REAL_SHAPE_DESCRIPTION, build_real_shape_wan

    return build_real_shape_wan(workdir / "wan13b_random", "1.3B", device="cuda"), REAL_SHAPE_DESCRIPTION


# ---- the two ways to generate ----------------------------------------------------------------------


def plain_diffusers(model: Path, req: InferRequest, device: str, calls: int) -> dict[str, float]:
    """What a user would write by hand: from_pretrained + one pipe(...) call (float32 VAE, as Wan does)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(model, vae=vae, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    load_s = time.perf_counter() - started
    seconds = []
    for _ in range(calls):  # a first call pays one-off warm-up; a second compares with a warm worker
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width, height=req.height,
                 num_frames=req.num_frames, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(req.seed or 0), output_type="np")
        _sync(device)
        seconds.append(time.perf_counter() - started)
    del pipe, vae
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"load_s": load_s, "first_generate_s": seconds[0], "generate_s": seconds[-1]}


def demo_cli(req: InferRequest, home: Path) -> dict[str, float]:
    """`python -m studio demo --generate` as a user runs it: its own timing of the generation and the
    whole command's wall time (interpreter start, imports and model load included)."""
    out = home / "demo_cli.mp4"
    argv = [sys.executable, "-m", "studio", "--home", str(home), "demo", "--generate", req.prompt, "--out", str(out),
            "--steps", str(req.steps), "--guidance", str(req.guidance_scale), "--seed", str(req.seed or 0)]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    wall_s = time.perf_counter() - started
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"generate_s": float(report["seconds"]), "command_wall_s": wall_s}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parse_variant(text: str) -> InferenceSpeed:
    """'exact', 'compile', 'flash3', 'cache:0.05', joined with '+' (e.g. 'flash3+compile') -> speed options."""
    speed = InferenceSpeed()
    for part in text.split("+"):
        name, _, value = part.partition(":")
        if name == "compile":
            speed = replace(speed, compile_blocks=True)
        elif name == "flash3":
            speed = replace(speed, attention="flash3")
        elif name == "cache":
            speed = replace(speed, step_cache=float(value or 0.05))
        elif name != "exact":
            raise SystemExit(f"unknown variant part {part!r}: use exact, compile, flash3, cache:T joined with '+'")
    return speed


Run = tuple[str, list[LoraSpec], bool, int]  # (name, LoRA stack, fuse, steps)


def studio_runs(model: Path, req: InferRequest, plan: list[Run], home: Path, speed: InferenceSpeed) -> dict[str, Any]:
    """The service path: one worker process kept warm across the planned requests."""
    from engine.gallery import Gallery
    from engine.inference.service import InferenceService
    from engine.paths import DataLayout
    from engine.store.db import Database

    layout = DataLayout(home).ensure()
    db = Database(layout.db_path)
    service = InferenceService(db, layout, None, Gallery(db, layout), idle_timeout_s=3600, speed=speed)
    runs: dict[str, Any] = {}
    try:
        for name, stack, fuse, steps in plan:
            r = InferRequest(**{**req.to_dict(), "loras": stack, "fuse_loras": fuse, "steps": steps})
            started = time.perf_counter()
            status = service.wait(service.submit(r, "bench"), timeout_s=3600)
            if status["state"] != "succeeded":
                raise RuntimeError(f"{name}: {status['state']}: {status['error']}")
            timings = {k: round(v, 4) for k, v in status["timings"].items() if isinstance(v, float)}
            runs[name] = {"wall_s": round(time.perf_counter() - started, 4), "steps": steps, **timings}
            print(json.dumps({"run": name, **runs[name]}), file=sys.stderr, flush=True)
    finally:
        service.shutdown()
        db.close()
    return runs


def run_plan(gpu: bool, req: InferRequest, loras: list[Path], with_loras: bool) -> list[Run]:
    """CPU: every run at full settings. GPU: a 2-step warm-up (load, compile), the full video, and the
    LoRA runs at 4 steps (they time loading and switching, not denoising)."""
    a, b = LoraSpec(str(loras[0]), 1.0), LoraSpec(str(loras[1]), 1.0)
    mix = [LoraSpec(str(loras[0]), 0.7), LoraSpec(str(loras[1]), 0.5)]
    lora_steps = 4 if gpu else req.steps
    plan: list[Run] = [("first", [], False, 2 if gpu else req.steps), ("second", [], False, req.steps)]
    if with_loras:
        plan += [("lora_a", [a], False, lora_steps), ("switch_to_b", [b], False, lora_steps),
                 ("mix_fused", mix, True, lora_steps)] + ([] if gpu else [("mix_a_b", mix, False, lora_steps)])
    return plan


def _summary(runs: dict[str, Any], req: InferRequest, plain_generate_s: float) -> dict[str, Any]:
    second = runs["second"]
    generate_s = second["text_encode_s"] + second["denoise_s"] + second["decode_s"]
    out = {"seconds_per_video": second["wall_s"], "generate_s": round(generate_s, 4),
           "denoise_s_per_step": round(second["denoise_s"] / req.steps, 4),
           "speedup_vs_plain": round(plain_generate_s / generate_s, 3),
           "first_request_wall_s": runs["first"]["wall_s"], "load_first_s": runs["first"]["load_s"],
           "load_second_s": second["load_s"]}
    if "lora_a" in runs:
        out.update(lora_load_s=runs["lora_a"]["lora_s"], lora_switch_s=runs["switch_to_b"]["lora_s"],
                   lora_fuse_s=runs["mix_fused"]["lora_s"], lora_a_wall_s=runs["lora_a"]["wall_s"],
                   fused_denoise_s=runs["mix_fused"]["denoise_s"],
                   unfused_denoise_s=runs.get("mix_a_b", runs["lora_a"])["denoise_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="random Wan2.1-1.3B shape on CUDA")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="worker speed variants (default: exact on CPU; compile, compile+cache:0.05 on GPU)")
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if args.gpu else CPU_DEFAULTS
    device = "cuda" if args.gpu else "cpu"
    variants = args.variants or (["compile", "compile+cache:0.05"] if args.gpu else ["exact"])
    speeds = {name: parse_variant(name) for name in variants}
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    if not args.gpu:
        apply_thread_policy("inference")  # the plain call gets the threads the worker and the CLI get
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        workdir = Path(tmp)
        build_started = time.perf_counter()
        model, model_desc = gpu_model(workdir) if args.gpu else cpu_model(workdir)
        loras = [random_lora(model, workdir / f"lora_{i}", rank=defaults["lora_rank"], seed=i) for i in (1, 2)]
        build_s = time.perf_counter() - build_started
        demo = not args.gpu and model_desc == "demo"
        req = InferRequest(model=str(model), prompt=CPU_PROMPT if demo else "a purple star spins over a green field",
                           negative_prompt="" if demo else "blurry", width=args.width or defaults["width"],
                           height=args.height or defaults["height"], num_frames=args.frames or defaults["frames"],
                           steps=args.steps or defaults["steps"], guidance_scale=defaults["guidance"], seed=1).validate()
        plain = plain_diffusers(model, req, device, calls=1 if args.gpu else 2)
        print(json.dumps({"plain": plain}), file=sys.stderr, flush=True)
        # The demo CLI only makes the demo's own size: compare with it only there.
        same_size = (req.width, req.height, req.num_frames) == (world.WIDTH, world.HEIGHT, world.NUM_FRAMES)
        cli = demo_cli(req, workdir / "cli_home") if demo and same_size else None
        results = {}
        for index, (name, speed) in enumerate(speeds.items()):
            plan = run_plan(args.gpu, req, loras, with_loras=index == 0)
            runs = studio_runs(model, req, plan, workdir / f"home_{index}", speed)
            results[name] = {**_summary(runs, req, plain["generate_s"]), "runs": runs}
            if cli is not None:
                results[name]["worker_vs_demo_generate"] = round(runs["second"]["wall_s"] / cli["generate_s"], 3)
            if args.gpu:
                results[name].update(_denoise_mfu(req, runs["second"]["denoise_s"]))
    record = {
        "bench": "infer", "device": device, "card": _card(args.gpu), "host": platform.node(), "model": model_desc,
        "width": req.width, "height": req.height, "frames": req.num_frames, "steps": req.steps,
        "guidance": req.guidance_scale, "lora_rank": defaults["lora_rank"], "build_s": round(build_s, 2),
        "plain_diffusers_load_s": round(plain["load_s"], 4),
        "plain_diffusers_first_generate_s": round(plain["first_generate_s"], 4),
        "plain_diffusers_generate_s": round(plain["generate_s"], 4),
        **({"demo_generate_s": round(cli["generate_s"], 4), "demo_generate_command_wall_s": round(cli["command_wall_s"], 2)}
           if cli else {}),
        "cpu_threads": None if args.gpu else cpu_threads("inference"),
        "variants": results,
    }
    line = json.dumps(record)
    print(line)
    if args.out:
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


def _denoise_mfu(req: InferRequest, denoise_s: float) -> dict[str, float]:
    """Model FLOP utilisation of the denoising loop (two transformer forwards per step with guidance)."""
    from bench.gpu_common import forward_flops, mfu, video_tokens

    forwards = req.steps * (2 if req.guidance_scale > 1.0 else 1)
    flops = forward_flops("1.3B", video_tokens(req.height, req.width, req.num_frames)) * forwards
    return {"denoise_tflops": round(flops / denoise_s / 1e12, 1), "denoise_mfu": round(mfu(flops, denoise_s), 3)}


def _card(gpu: bool) -> str:
    if gpu:
        return torch.cuda.get_device_name(0)
    import os

    return f"{os.cpu_count()} cpu cores, {torch.get_num_threads()} torch threads"


if __name__ == "__main__":
    sys.exit(main())
