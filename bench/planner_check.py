"""The planner's estimates against what was measured (issue 18).

    python bench/planner_check.py                  # recorded GPU runs (bench/RESULTS.md, REFERENCE)
    python bench/planner_check.py --cpu-run        # + the demo LoRA on this CPU: s/step and host RAM

GPU cases are the numbers already recorded, each with its card and source; "fit" cases were used to
fit the constants of engine/planner_rates.py, "check" cases were not. The CPU run trains the demo
LoRA through `python -m engine.trainer` for a few steps at two clip sizes and records the trainer's
own s/step and the peak memory of its process tree (PSS: shared pages counted once), with the machine's
load average at the end: CPU step times swing with other work, and the plan states the band they were
seen in (CPU_RATES.time_band).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import TrainConfig  # noqa: E402
from engine.families.wan_random import transformer_config  # noqa: E402
from engine.planner import DeviceSet, Workload, estimate  # noqa: E402
from engine.planner_shapes import Clip, ModelShape  # noqa: E402

PLAIN = {"activation_checkpointing": True}  # diffusers + peft + torch AdamW: fp32 LoRA matmuls, eager
B = {"activation_checkpointing": True, "performance.checkpointing": "save_attention",
     "performance.lora_compute_dtype": "activation", "performance.compile_blocks": True}
FAST_JOB = {"activation_checkpointing": True, "performance.checkpointing": "save_attention",
            "performance.lora_compute_dtype": "activation", "performance.attention_backend": "cudnn"}


@dataclass
class Case:
    name: str
    card: str
    gpus: int
    preset: str
    clip: Clip
    options: dict
    s_per_step: float | None
    peak_gib: float | None
    role: str  # what was fitted on it ("fit": time and memory); "check": not used for fitting
    source: str


R = "bench/RESULTS.md"
CASES = [
    Case("plain 1.3B 480x832x33", "H200", 1, "1.3B", Clip(832, 480, 33), PLAIN, 0.853, 6.9, "memory fit, time check", "REFERENCE"),
    Case("plain 1.3B 33f, no checkpointing", "H200", 1, "1.3B", Clip(832, 480, 33),
         {"activation_checkpointing": False}, 0.619, 45.4, "memory fit, time check", "REFERENCE"),
    Case("plain 1.3B 480x832x81", "H200", 1, "1.3B", Clip(832, 480, 81), PLAIN, 2.87, 11.7, "memory fit, time check", "REFERENCE"),
    Case("plain 1.3B 81f, compiled blocks", "H200", 1, "1.3B", Clip(832, 480, 81),
         {**PLAIN, "performance.compile_blocks": True}, 2.33, 10.5, "memory fit, time check", "REFERENCE"),
    Case("plain 14B 480x832x81", "H200", 1, "14B", Clip(832, 480, 81), PLAIN, 14.06, 54.7, "memory fit, time check", "REFERENCE"),
    Case("plain 1.3B 81f (re-measured)", "H200", 1, "1.3B", Clip(832, 480, 81), PLAIN, 3.233, 12.1, "check",
         "REFERENCE 2026-11-27"),
    Case("trainer cudnn+save_attention+act+compile 1.3B 81f", "H200", 1, "1.3B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "cudnn"}, 1.966, 13.9, "check", "REFERENCE 2026-11-27"),
    Case("plain 1.3B 81f", "H100", 1, "1.3B", Clip(832, 480, 81), PLAIN, 3.463, 12.08, "time fit, memory check", R + " third session"),
    Case("trainer flash3+B 1.3B 81f", "H100", 1, "1.3B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "flash3"}, 1.833, 13.88, "fit", R + " third session"),
    Case("trainer cudnn+B 1.3B 81f", "H100", 1, "1.3B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "cudnn"}, 2.016, 13.88, "fit", R + " third session"),
    Case("trainer flash3+B 14B 81f", "H100", 1, "14B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "flash3"}, 9.203, 63.17, "check", R + " third session"),
    Case("trainer cudnn+B 14B 81f", "H100", 1, "14B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "cudnn"}, 10.032, 63.16, "check", R + " second session"),
    Case("trainer flash3+B 1.3B 81f", "H200", 1, "1.3B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "flash3"}, 1.756, 13.88, "time fit (H200/H100 ratio), memory check", R + " third session"),
    Case("trainer flash3+B 1.3B 81f, 2 GPUs", "H200", 2, "1.3B", Clip(832, 480, 81),
         {**B, "performance.attention_backend": "flash3"}, 1.758, None, "check", R + " third session"),
    Case("studio job 848x480x81 (cudnn, save_attention, act LoRA, eager)", "H200", 1, "1.3B", Clip(848, 480, 81),
         FAST_JOB, 2.448, None, "check", R + " GPU acceptance"),
    Case("studio job 848x480x81, 2 GPUs", "H200", 2, "1.3B", Clip(848, 480, 81), FAST_JOB, 2.494, None, "check",
         R + " GPU acceptance"),
    Case("studio job 848x480, buckets 33+81 (peak of 6 steps)", "H200", 1, "1.3B", Clip(848, 480, 81), FAST_JOB,
         None, 13.0, "memory fit", R + " GPU acceptance"),
]


def planned(case: Case) -> tuple[float, float]:
    cfg = TrainConfig(output_dir="o")
    for path, value in case.options.items():
        cfg = cfg.with_value(path, value)
    shape = ModelShape.from_transformer_config(transformer_config(case.preset))
    work = Workload(case.clip, {case.clip: 1}, {}, None, "config")
    result = estimate(cfg, shape, DeviceSet.gpus(case.card, count=case.gpus), work)
    return result.s_per_step, result.gpu_peak_gib


def error(estimate_value: float, measured: float | None) -> str:
    return "" if measured is None else f"{(estimate_value / measured - 1) * 100:+.1f}%"


def gpu_table() -> list[dict]:
    rows = []
    for case in CASES:
        step, peak = planned(case)
        rows.append({"case": case.name, "card": case.card, "gpus": case.gpus, "role": case.role,
                     "s_step_measured": case.s_per_step, "s_step_planned": round(step, 3),
                     "s_step_error": error(step, case.s_per_step),
                     "peak_measured": case.peak_gib, "peak_planned": round(peak, 2),
                     "peak_error": error(peak, case.peak_gib), "source": case.source})
    return rows


# ---- the CPU demo run ----------------------------------------------------------------------------------
def cpu_run(frames: int, batch: int, steps: int) -> dict:
    """Train the demo LoRA for `steps` steps on the CPU; the planner's estimate next to what happened."""
    import psutil

    from engine.planner import plan_training
    from studio.presets import DEMO_PRESET, load_preset

    from engine.demo.setup import ensure_demo_assets

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        ensure_demo_assets(home)
        cfg = load_preset(DEMO_PRESET, home / "runs", home)
        cfg = (cfg.with_value("max_steps", steps).with_value("micro_batch_size_per_gpu", batch)
               .with_value("dataset.frame_buckets", [frames]))
        cfg.sample = None
        cfg.cache_dir = str(home / "cache")
        config = home / "run.toml"
        config.write_text(cfg.to_toml())
        plan = plan_training(cfg, DeviceSet.cpu(1))
        run_dir = home / "run"
        process = subprocess.Popen([sys.executable, "-m", "engine.trainer", "--config", str(config),
                                    "--run-dir", str(run_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT)
        peak = 0
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(_proportional_bytes(p) for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.25)
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        step_events = [e for e in events if e.get("event") == "step"]
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(step_events, step_events[1:])]
        times = times[len(times) // 3:]  # after warm-up
        measured = sum(times) / len(times)
        cache = sum(p.stat().st_size for p in (home / "cache").rglob("*") if p.is_file())
        cache_planned = plan.estimate.cache_gib * 2**30
        low, high = plan.estimate.time_band or (1.0, 1.0)
        return {"clip": str(plan.clip), "batch": batch, "steps": steps,
                "s_step_measured": round(measured, 3), "s_step_planned": round(plan.estimate.s_per_step, 3),
                "s_step_error": error(plan.estimate.s_per_step, measured),
                "within_band": low * plan.estimate.s_per_step <= measured <= high * plan.estimate.s_per_step,
                "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                "host_gib_measured": round(peak / 2**30, 2), "host_gib_planned": round(plan.estimate.host_ram_gib, 2),
                "host_error": error(plan.estimate.host_ram_gib, peak / 2**30),
                "cache_mib_measured": round(cache / 2**20, 2), "cache_mib_planned": round(cache_planned / 2**20, 2)}


def _proportional_bytes(process) -> int:
    """A process's share of the memory it touches (PSS, Linux): summing RSS over a process tree counts
    the pages that forked children share with their parent (the model, torch's code) once per child."""
    try:
        return process.memory_full_info().pss
    except AttributeError:  # no PSS on this platform
        return process.memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-run", action="store_true", help="also train the demo LoRA on this CPU")
    parser.add_argument("--cpu-cases", default="17x4,17x1,9x4", help="frames x batch, comma-separated")
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    for row in gpu_table():
        print(json.dumps(row))
    if args.cpu_run:
        for case in args.cpu_cases.split(","):
            frames, batch = (int(v) for v in case.split("x"))
            print(json.dumps({"cpu": cpu_run(frames, batch, args.steps)}))


if __name__ == "__main__":
    main()
