"""The users file: scrypt hashes, the CLI that writes it, and per-user access rules."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from studio.auth import Accounts, AccessDenied, AuthError, UsersFile, hash_password, verify_password

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_hash_is_salted_and_verifies() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second  # salted
    assert first.startswith("scrypt$")
    assert verify_password("correct horse", first)
    assert not verify_password("correct horsE", first)
    assert not verify_password("x", "not-a-hash")


def test_users_file_roundtrip_and_rules(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.toml")
    users.add("alice", "alice-secret", admin=True)
    users.add("bob", "bob-secret")
    assert "alice-secret" not in users.path.read_text()
    assert stat.S_IMODE(users.path.stat().st_mode) == 0o600
    assert users.check("alice", "alice-secret")
    assert not users.check("alice", "bob-secret")
    assert not users.check("carol", "anything-at-all")
    with pytest.raises(AuthError, match="already exists"):
        users.add("bob", "another-secret")
    with pytest.raises(AuthError, match="at least"):
        users.add("dave", "short")
    with pytest.raises(AuthError, match="user name"):
        users.add("../evil", "long-enough-pw")

    accounts = Accounts(UsersFile(users.path))  # a fresh reader sees the file
    alice, bob = accounts.user("alice"), accounts.user("bob")
    assert alice.is_admin and not bob.is_admin
    assert alice.can_access("bob") and bob.can_access("bob") and not bob.can_access("alice")
    with pytest.raises(AccessDenied, match="not found"):
        accounts.check_owner(bob, "alice", "job 3")
    with pytest.raises(AccessDenied):
        accounts.user(None)
    users.remove("bob")
    with pytest.raises(AccessDenied):
        accounts.user("bob")  # the change is seen without restart


def test_without_users_file_everyone_is_local_admin() -> None:
    user = Accounts(None).user(None)
    assert user.is_admin and user.name == "local"


def test_cli_users_add_list(tmp_path: Path) -> None:
    file = tmp_path / "conf" / "users.toml"
    env = {**os.environ, "STUDIO_HOME": str(tmp_path / "home")}

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "studio", "users", *args, "--auth-file", str(file)],
                              cwd=REPO_ROOT, input=stdin, capture_output=True, text=True, env=env, timeout=120)

    added = cli("add", "alice", "--admin", "--password-stdin", stdin="alice-secret\n")
    assert added.returncode == 0, added.stderr
    assert cli("add", "bob", "--password-stdin", stdin="bob-secret\n").returncode == 0
    again = cli("add", "bob", "--password-stdin", stdin="bob-secret\n")
    assert again.returncode == 2 and "already exists" in again.stderr
    listed = cli("list")
    assert listed.stdout.split("\n")[:2] == ["alice (admin)", "bob"]
    assert UsersFile(file).check("bob", "bob-secret")
