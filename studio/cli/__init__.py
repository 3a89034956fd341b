"""CLI dispatcher. Each command module has `register(subparsers)` and sets `func(args, settings) -> int`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from studio.settings import SettingsError, add_settings_arguments, load_settings, settings_flag_names

COMMANDS = ("serve", "demo", "train", "jobs", "infer", "gallery", "users", "config", "dataset", "mcp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Video LoRA Studio CLI")
    add_settings_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"studio.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"studio.cli.{name}":
                raise
            continue  # command not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = settings_flag_names()
        settings = load_settings(argparse.Namespace(**{k: v for k, v in vars(args).items() if k in names}))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args, settings) or 0)
