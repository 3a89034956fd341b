"""A stand-in for engine.trainer in scheduler tests: same command line, same metrics events and
control files, no model. Run as a script; pytest collects nothing here.

Behaviour flags: --steps N --step-s S --mode ok|fail|oom|ignore-stop|child
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def emit(run_dir: Path, event: str, **fields) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def rank0_ended(run_dir: Path, since: float) -> bool:
    """Rank 0 wrote its final event after `since` (this launch, not an earlier attempt)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    return any(event.get("event") in ("done", "stopped", "error") and event.get("time", 0) >= since
               for event in map(json.loads, lines[-5:]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--control-since", type=float, default=None)  # passed by the studio's launcher
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the DeepSpeed launcher
    parser.add_argument("--steps", type=int, default=int(os.environ.get("STANDIN_STEPS", "5")))
    parser.add_argument("--step-s", type=float, default=float(os.environ.get("STANDIN_STEP_S", "0.05")))
    parser.add_argument("--mode", default="ok")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks keep busy until rank 0 ends, like real ranks
        started = time.time()
        while not (run_dir / "stop").exists() and not rank0_ended(run_dir, since=started):
            time.sleep(0.05)
        return 0
    assert Path(args.config).is_file(), "config must be copied into the run dir"
    first = 1
    if args.resume:
        first = int((run_dir / "latest").read_text()) + 1
    terminated = []  # like the real trainer: SIGTERM ends the run cleanly with a `stopped` event
    if args.mode == "ignore-stop":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    if args.mode == "child":  # a grandchild in the same process group, like DeepSpeed's ranks
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"standin pid {os.getpid()} resume={args.resume} first={first} "
          f"home={os.environ.get('STUDIO_HOME')} world={os.environ.get('WORLD_SIZE')} "
          f"port={os.environ.get('MASTER_PORT')} unbuffered={os.environ.get('PYTHONUNBUFFERED')}", flush=True)
    emit(run_dir, "start", total_steps=args.steps, epochs=1, world_size=1, steps_per_epoch=args.steps)
    for step in range(first, args.steps + 1):
        if ((run_dir / "stop").exists() and args.mode != "ignore-stop") or terminated:
            emit(run_dir, "stopped", step=step - 1)
            return 0
        if (run_dir / "save").exists():
            (run_dir / "save").unlink()
            emit(run_dir, "save", step=step, epoch=1, path=str(run_dir / f"step{step}"))
        if args.mode in ("fail", "oom") and step == 2:
            message = "CUDA out of memory. Tried to allocate 2.00 GiB" if args.mode == "oom" else "boom"
            print(f"Traceback (most recent call last):\nRuntimeError: {message}", file=sys.stderr, flush=True)
            emit(run_dir, "error", message=message)
            return 1
        time.sleep(args.step_s)
        emit(run_dir, "step", step=step, total_steps=args.steps, epoch=1, loss=1.0 / step, lr=1e-4,
             grad_norm=1.0, samples_per_s=10.0, elapsed_s=step * args.step_s,
             eta_s=(args.steps - step) * args.step_s)
        (run_dir / "latest.tmp").write_text(str(step))  # atomic, like a real checkpoint: kill -9 may come
        (run_dir / "latest.tmp").replace(run_dir / "latest")
        (run_dir / "global_step1").mkdir(exist_ok=True)  # what the scheduler checks before --resume
        (run_dir / "global_step1" / "complete.json").write_text("{}")
    emit(run_dir, "done", step=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
