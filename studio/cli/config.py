"""`python -m studio config check FILE`: parse and validate a training TOML (diffusion-pipe shape);
print what the studio does instead of each key it accepts but does not implement. Exit 0 when the
config is valid (warnings or not), 2 when it is not."""
from __future__ import annotations

import argparse
import sys

from engine.config import ConfigError, TrainConfig
from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="check a training config")
    actions = parser.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="validate a training TOML and list its warnings")
    check.add_argument("file", help="training config TOML (diffusion-pipe style)")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace, settings: StudioSettings) -> int:
    try:
        cfg = TrainConfig.from_toml_file(args.file).validate()
    except ConfigError as exc:
        for path, why in exc.errors:
            print(f"error: {path}: {why}" if path else f"error: {why}", file=sys.stderr)
        return 2
    for warning in cfg.warnings:
        print(f"warning: {warning}")
    print(f"{args.file}: valid ({len(cfg.warnings)} warning(s))")
    return 0
