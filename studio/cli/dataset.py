"""`python -m studio dataset check DIR|CONFIG [--frame-buckets 1,33]`: the dataset preview the Train tab
shows and the trainer follows: every file with its buckets or "skipped: <reason>", the samples per
bucket and the steps per epoch. Exit 0 when something is trainable, 2 when nothing is."""
from __future__ import annotations

import argparse
import json
import sys

from engine.config import ConfigError
from studio.datasets import DatasetError, check, dataset_target
from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dataset", help="check a dataset folder or a config's dataset")
    actions = parser.add_subparsers(dest="action", required=True)
    command = actions.add_parser("check", help="list every file with its bucket, or why it is skipped")
    command.add_argument("target", help="a dataset folder, a dataset TOML or a training TOML")
    command.add_argument("--frame-buckets", dest="frame_buckets", default="",
                         help="for a folder: frame buckets, e.g. 1,33 (default: the config default)")
    command.add_argument("--json", action="store_true", help="print the preview as JSON")
    command.set_defaults(func=run_check)


def run_check(args: argparse.Namespace, settings: StudioSettings) -> int:
    try:
        buckets = [int(b) for b in args.frame_buckets.split(",") if b.strip()]
        dataset, cfg = dataset_target(args.target, buckets or None)
        found = check(dataset, cfg.micro_batch_size_per_gpu if cfg else 1, cfg.gradient_accumulation_steps if cfg else 1)
    except (ConfigError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        print_preview(found)
    return 0 if found["trainable"] else 2


def print_preview(found: dict) -> None:
    for row in found["files"]:
        where = f"skipped: {row['skipped']}" if row["skipped"] else ", ".join(row["buckets"])
        print(f"{row['file']}\t{row['kind']}\t{row['size']}\t{row['frames'] or '?'} frames\t{where}")
    for bucket, count in found["bucket_counts"].items():
        print(f"bucket {bucket}: {count} samples")
    for warning in found["warnings"]:
        print(f"warning: {warning}")
    print(f"{found['samples']} samples per epoch, {found['steps_per_epoch']} steps per epoch on one GPU"
          + ("" if found["trainable"] else " -- nothing trainable"))
