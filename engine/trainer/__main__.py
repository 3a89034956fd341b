"""Command line of the trainer.

    deepspeed [--num_gpus N | --include localhost:0,1] --master_port P --module engine.trainer \
        --config run.toml [--run-dir DIR] [--resume]
    python -m engine.trainer --config run.toml [--run-dir DIR] [--resume]

Exit codes: 0 done or stopped, 2 bad config/dataset/model (an `error` event names it), 1 crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from engine.config import ConfigError, TrainConfig

logger = logging.getLogger("engine.trainer")

EXIT_OK, EXIT_CRASH, EXIT_BAD_INPUT = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="engine.trainer", description="LoRA training of Wan video models.")
    parser.add_argument("--config", required=True, type=Path, help="training TOML (diffusion-pipe shape)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory (default: output_dir/<timestamp>; with --resume: newest resumable run)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--control-since", type=float, default=None, metavar="UNIX_TIME",
                        help="stop/save requests in the run dir made before this time belong to an earlier "
                             "launch and are discarded (default: this process's start)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    from engine.rundir import METRICS_FILE
    from engine.trainer.runfiles import MetricsWriter

    def early_error(message: str) -> int:
        logger.error(message)
        if args.run_dir is not None and rank == 0:
            MetricsWriter(args.run_dir / METRICS_FILE).emit("error", message=message)
        return EXIT_BAD_INPUT

    try:
        cfg = TrainConfig.from_toml_file(args.config).validate()
    except ConfigError as exc:
        return early_error(f"config error: {exc}")

    from engine.trainer.distributed import broadcast_object, close_distributed, init_distributed
    from engine.trainer.loop import Trainer

    dist = init_distributed()
    _cap_gpu_memory(dist.device)
    # Rank 0 picks the run directory (a timestamp or a resumable run) and tells the others.
    choice = broadcast_object(_choose_run_dir(cfg, args) if dist.is_main else None, dist)
    if isinstance(choice, str):
        return early_error(choice)
    run_dir = choice
    assert isinstance(run_dir, Path)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    events = MetricsWriter(run_dir / METRICS_FILE if dist.is_main else None)
    try:
        code = Trainer(cfg, run_dir, dist, events, resume=args.resume, control_since=args.control_since).run()
        close_distributed(dist)  # on the clean path only: a rank that crashed cannot take part
        return code
    except _bad_input_errors() as exc:
        events.emit("error", message=str(exc))
        logger.error("%s", exc)
        return EXIT_BAD_INPUT
    except Exception as exc:
        from engine.planner import advice_after_oom

        events.emit("error", message=f"{type(exc).__name__}: {exc}{advice_after_oom(cfg, exc, dist.world_size)}")
        traceback.print_exc()
        return EXIT_CRASH


def _cap_gpu_memory(device) -> None:  # noqa: ANN001 - a torch.device
    """STUDIO_GPU_MEMORY_CAP_GIB=N: this process may allocate at most N GiB of its GPU, a stand-in for a
    smaller card when measuring what fits (torch.cuda.set_per_process_memory_fraction)."""
    from engine.planner_estimate import memory_cap_gib

    cap = memory_cap_gib()
    if cap is None or device.type != "cuda":
        return
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), device)
    logger.info("GPU memory capped at %s GiB of %.1f", cap, total / 2**30)


def _choose_run_dir(cfg: TrainConfig, args: argparse.Namespace) -> Path | str:
    """The run directory, or an error message (every rank must learn about the failure)."""
    from engine.rundir import find_resumable_run, new_run_dir

    if args.run_dir is not None:
        return args.run_dir.resolve()
    output_dir = Path(cfg.output_dir).resolve()
    if args.resume:
        found = find_resumable_run(output_dir)
        if found is None:
            return f"--resume: no run with a complete checkpoint under {output_dir}"
        return found
    return new_run_dir(output_dir)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from engine.lora import LoraError
    from engine.models import ModelNotFoundError
    from engine.dataset import DatasetError
    from engine.rundir import ResumeError

    return (ConfigError, DatasetError, ModelNotFoundError, LoraError, ResumeError)


if __name__ == "__main__":
    sys.exit(main())
