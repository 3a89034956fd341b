"""`studio train CONFIG.toml [--gpus 0,1 | --num-gpus N] [--run-dir DIR] [--follow] [--owner NAME]`.

Queues a training job in the studio's database. When no studio runs, this process launches it
(the trainer then runs on in its own session); otherwise the running studio does.
`--plan [--card "RTX 4090:24"]` queues nothing: it prints whether the config fits and how long it
takes (engine.planner), exit 0 when it fits, 3 when it does not.
"""
from __future__ import annotations

import argparse
import getpass
import sys

from engine.config import ConfigError, TrainConfig
from engine.dataset import DatasetError, plan_dataset, require_trainable
from engine.jobs import JobError
from studio.cli.jobs import launch_and_report, open_scheduler
from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="queue a LoRA training run from a TOML config")
    parser.add_argument("config", help="training config TOML (diffusion-pipe style)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus", help="explicit GPU indices, e.g. 0,1")
    devices.add_argument("--num-gpus", dest="num_gpus", type=int,
                         help="how many GPUs (or CPU ranks on a machine without GPUs); default 1")
    parser.add_argument("--follow", action="store_true", help="show progress until the job ends; "
                        "the exit status is the job's")
    parser.add_argument("--owner", default=None, help="owner of the job (default: your login name)")
    parser.add_argument("--name", default=None, help="job name (default: the output_dir's name)")
    parser.add_argument("--priority", type=int, default=0, help="higher starts first")
    parser.add_argument("--run-dir", dest="run_dir", default=None,
                        help="run directory instead of runs/<id>-<name> (multi-node: one shared directory)")
    parser.add_argument("--plan", action="store_true",
                        help="queue nothing: estimate memory and time, say whether it fits and what would make it fit")
    parser.add_argument("--card", default="", help='with --plan: a card instead of this machine\'s GPUs, '
                        'e.g. "RTX 4090" or "RTX 4090:24" (GiB)')
    parser.set_defaults(func=run)


EXIT_DOES_NOT_FIT = 3


def print_plan(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from engine.gpus import GpuInventory
    from engine.planner import DeviceSet, plan_training

    try:
        devices = DeviceSet.choose(GpuInventory().list(), args.gpus or "", args.num_gpus, args.card)
        plan = plan_training(cfg, devices)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in plan.summary():
        print(line)
    return 0 if plan.fits else EXIT_DOES_NOT_FIT


def parse_gpus(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise JobError(f"--gpus: expected indices like 0,1, got {text!r}") from None


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    try:
        cfg = TrainConfig.from_toml_file(args.config).validate()
        if args.plan:
            return print_plan(cfg, args)
        # Refused before queueing: the run would fail minutes later on the same plan.
        require_trainable(plan_dataset(cfg.dataset), ", ".join(d.path for d in cfg.dataset.directory),
                          cfg.micro_batch_size_per_gpu)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    config_toml = cfg.to_toml()
    sched = open_scheduler(settings)
    try:
        job = sched.submit_training(config_toml, args.owner or _login(),
                                    gpus=parse_gpus(args.gpus) if args.gpus else None,
                                    num_gpus=args.num_gpus, name=args.name, priority=args.priority,
                                    run_dir=args.run_dir)
        print(f"job {job.id} queued: {job.name} -> {job.run_dir}")
        return launch_and_report(sched, job, args.follow, sys.stdout, args.hint)
    except (JobError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sched.shutdown()


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "cli"
