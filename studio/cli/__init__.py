"""CLI dispatcher. Each command module has `register(subparsers)` and sets `func(args, settings) -> int`.

The studio's settings flags (--home, --port, ...) and -v are accepted before or after the command;
hints printed for a follow-up command repeat the settings flags this one was given (`args.hint`)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator

from studio.settings import SettingsError, add_settings_arguments, load_settings, settings_flag_names

COMMANDS = ("serve", "demo", "train", "jobs", "infer", "gallery", "users", "config", "dataset", "mcp")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default when it has one worth showing and its help does not name it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, "", [], argparse.SUPPRESS)
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


def add_global_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, after: bool) -> None:
    """The settings flags and -v. After the command they default to "not given", so they never
    overwrite the same flag given before it; a flag the command defines itself keeps its meaning."""
    class Guarded:
        def add_argument(self, *flags: str, **kwargs) -> None:
            if after:
                kwargs["default"] = argparse.SUPPRESS
            try:
                parser.add_argument(*flags, **kwargs)
            except argparse.ArgumentError:  # e.g. `users --auth-file`: the command's own flag
                pass

    add_settings_arguments(Guarded())  # type: ignore[arg-type]
    Guarded().add_argument("-v", "--verbose", action="count", default=0,
                           help="log INFO lines (-vv: DEBUG); quiet (warnings only) by default")


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield child
                yield from _parsers(child)


def program_name() -> str:
    """How this CLI was called: `studio` (the installed command) or `python -m studio`."""
    return "studio" if os.path.basename(sys.argv[0] or "") == "studio" else "python -m studio"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description="Video LoRA Studio CLI",
                                     formatter_class=HelpFormatter)
    add_global_flags(parser, after=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"studio.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"studio.cli.{name}":
                raise
            continue  # command not built yet
        module.register(subparsers)
    for child in _parsers(parser):
        child.formatter_class = HelpFormatter
        add_global_flags(child.add_argument_group("studio settings (also before the command)"), after=True)
    return parser


def hint_prefix(args: argparse.Namespace) -> str:
    """The command line that reaches the same studio: program name + the settings flags given."""
    probe = argparse.ArgumentParser(add_help=False)
    add_settings_arguments(probe)
    words = [program_name()]
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if value is None or not action.option_strings:
            continue
        words += [action.option_strings[0]] if value is True else [action.option_strings[0], str(value)]
    return " ".join(shlex.quote(w) if i else w for i, w in enumerate(words))


def log_level(args: argparse.Namespace) -> str:
    if getattr(args, "log_level", None):
        return args.log_level.upper()
    return {0: "WARNING", 1: "INFO"}.get(args.verbose, "DEBUG")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = settings_flag_names()
        settings = load_settings(argparse.Namespace(**{k: v for k, v in vars(args).items() if k in names}))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.hint = hint_prefix(args)
    logging.basicConfig(level=log_level(args), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args, settings) or 0)
