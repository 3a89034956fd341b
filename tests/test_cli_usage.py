"""How the CLI is called: settings flags before or after the command, help and defaults for every flag,
follow-up hints that keep the flags given, quiet by default, and what a run leaves behind."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import _parsers, build_parser, hint_prefix, log_level, main
from tests.ui_support import REPO_ROOT


def test_settings_flags_work_before_or_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    before = parser.parse_args(["--home", "/data/a", "--port", "8000", "serve"])
    after = parser.parse_args(["serve", "--port", "8000", "--home", "/data/a"])
    assert (before.home, before.port) == (after.home, after.port) == ("/data/a", "8000")
    nested = parser.parse_args(["--home", "/data/b", "jobs", "show", "3", "-v"])
    assert nested.home == "/data/b" and nested.verbose == 1  # a flag before is kept, not reset by the command
    assert parser.parse_args(["users", "list", "--auth-file", "u.toml"]).users_file == "u.toml"  # its own flag
    assert main(["jobs", "list", "--home", str(tmp_path / "home")]) == 0
    assert (tmp_path / "home" / "studio.db").is_file() and "no jobs" in capsys.readouterr().out


def test_every_flag_has_help_and_serve_shows_its_flags(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    missing = [f"{sub.prog}: {action.dest}" for sub in [parser, *_parsers(parser)] for action in sub._actions
               if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert not missing
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--port" in text and "--home" in text and "-v, --verbose" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["jobs", "list", "--help"])
    assert "(default: 30)" in capsys.readouterr().out  # defaults are shown


def test_hints_repeat_the_flags_given_and_logging_is_quiet_unless_asked() -> None:
    parser = build_parser()
    for argv in (["--home", "/my data", "demo", "--prepare"], ["demo", "--prepare", "--home", "/my data"]):
        assert hint_prefix(parser.parse_args(argv)).endswith(" --home '/my data'")
    assert hint_prefix(parser.parse_args(["demo"])) in ("studio", "python -m studio")
    assert log_level(parser.parse_args(["demo"])) == "WARNING"
    assert log_level(parser.parse_args(["demo", "-v"])) == "INFO"
    assert log_level(parser.parse_args(["-vv", "demo"])) == "DEBUG"
    assert log_level(parser.parse_args(["demo", "--log-level", "error"])) == "ERROR"


def test_a_fresh_process_prints_no_info_lines(tmp_path: Path) -> None:
    env = {**os.environ, "STUDIO_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "studio", "jobs", "list"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no jobs" in done.stdout
    assert "INFO" not in done.stderr, done.stderr  # no schema migration or queue leadership lines


def test_the_installed_command_is_the_cli() -> None:
    import importlib
    import tomllib

    target = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]["studio"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is main
