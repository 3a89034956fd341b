"""`python -m studio serve`: the same as `python app.py`."""
from __future__ import annotations

import argparse

from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the web UI (same as python app.py)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    from studio.serve import serve

    return serve(settings)
