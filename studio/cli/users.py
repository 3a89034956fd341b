"""`python -m studio users add|remove|list`: manage the users file (salted scrypt hashes)."""
from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from studio.auth import AuthError, UsersFile
from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("users", help="manage the accounts of the users file (--auth-file)")
    actions = parser.add_subparsers(dest="users_action", required=True)
    add = actions.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name", help="the login name")
    add.add_argument("--admin", action="store_true", help="may see and control every user's jobs")
    add.add_argument("--replace", action="store_true", help="set a new password for an existing user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name", help="the login name")
    actions.add_parser("list", help="list users")
    for sub in (add, remove, actions.choices["list"]):
        # Own dest: the global --auth-file must exist already, this one may be created.
        sub.add_argument("--auth-file", dest="users_file", help="the users TOML file (created if missing)")
    parser.set_defaults(func=run)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise AuthError("the two passwords differ")
    return first


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    path = args.users_file or settings.auth_file
    if path is None:
        print("error: give --auth-file FILE (or STUDIO_AUTH_FILE)", file=sys.stderr)
        return 2
    users = UsersFile(Path(path))
    try:
        if args.users_action == "add":
            user = users.add(args.name, _read_password(args.password_stdin), admin=args.admin,
                             replace=args.replace)
            print(f"{'admin' if user.is_admin else 'user'} {user.name} saved in {users.path}")
        elif args.users_action == "remove":
            users.remove(args.name)
            print(f"user {args.name} removed from {users.path}")
        else:
            for name in users.names():
                user = users.get(name)
                print(f"{name}{' (admin)' if user and user.is_admin else ''}")
    except AuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
