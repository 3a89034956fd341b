"""`python -m studio mcp [--user NAME]`: the studio as an MCP server on stdio, for agents (studio.mcp_server).

An MCP client starts it, e.g. in its config: {"command": "python", "args": ["-m", "studio", "mcp"]}.
It runs the queue like the web app does (or joins the app's queue when one is running), as NAME
(required when the studio has accounts; single-user studios act as the local user).
"""
from __future__ import annotations

import argparse
import logging
import sys

from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mcp", help="serve the studio's actions to agents over MCP (stdio)")
    parser.add_argument("--user", default=None, help="the studio user the agent acts as (with accounts)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    from studio.api import StudioApi
    from studio.auth import AccessDenied
    from studio.context import StudioContext
    from studio.mcp_server import serve

    # stdout is the protocol: every log line goes to stderr.
    logging.getLogger().handlers[:] = [logging.StreamHandler(sys.stderr)]
    ctx = StudioContext.create(settings, start=True)
    try:
        serve(StudioApi(ctx), args.user)
    except AccessDenied as exc:
        print(f"error: {exc} (give --user NAME of a studio account)", file=sys.stderr)
        return 2
    finally:
        ctx.close()
    return 0
