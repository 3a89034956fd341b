"""Accounts: a `users.toml` file of salted scrypt hashes, and who may touch which job or video.

File format (written by `python -m studio users add NAME`)::

    [users.alice]
    hash = "scrypt$16384$8$1$<salt hex>$<hash hex>"
    admin = true

The file is re-read when it changes, so adding a user needs no restart. Without an auth file the
studio is single-user: everyone is the local admin (it listens on 127.0.0.1 by default).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

log = logging.getLogger(__name__)

# scrypt cost: ~50 ms and 16 MiB per check on a laptop; slow enough for offline guessing.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
LOCAL_USER = "local"
MIN_PASSWORD_CHARS = 8
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class AuthError(ValueError):
    """A bad users file, user name or password; the message says which."""


class AccessDenied(PermissionError):
    """The signed-in user may not see or change this object."""


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool = False

    def can_access(self, owner: str | None) -> bool:
        return self.is_admin or owner == self.name


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES)
    return f"scrypt${n}${r}${p}${salt.hex()}${key.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, key_hex = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(key_hex)
        key = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(key, expected)


def validate_user_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise AuthError(f"user name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if name == LOCAL_USER:
        raise AuthError(f"user name {name!r} is reserved for the no-login mode")
    return name


class UsersFile:
    """The users TOML file: read (cached by mtime), check passwords, add and remove users."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, dict]] | None = None
        # A fixed dummy hash so an unknown name costs the same scrypt work as a known one.
        self._dummy_hash = hash_password(secrets.token_hex(8))

    def _entries(self) -> dict[str, dict]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        with self._lock:
            if self._cache is None or self._cache[0] != mtime:
                try:
                    data = tomllib.loads(self.path.read_text(encoding="utf-8"))
                except tomllib.TOMLDecodeError as exc:
                    raise AuthError(f"{self.path}: invalid TOML: {exc}") from None
                users = data.get("users", {})
                if not isinstance(users, dict):
                    raise AuthError(f"{self.path}: [users] must be a table")
                self._cache = (mtime, users)
            return self._cache[1]

    def names(self) -> list[str]:
        return sorted(self._entries())

    def get(self, name: str) -> User | None:
        entry = self._entries().get(name)
        if entry is None:
            return None
        return User(name=name, is_admin=bool(entry.get("admin", False)))

    def check(self, name: str, password: str) -> bool:
        """Gradio's auth callable: True when the name exists and the password matches."""
        entry = self._entries().get(name)
        encoded = entry.get("hash", "") if isinstance(entry, dict) else ""
        ok = verify_password(password, encoded or self._dummy_hash)
        if not (ok and encoded):
            log.warning("failed login for user %r", name)
            return False
        return True

    def add(self, name: str, password: str, *, admin: bool = False, replace: bool = False) -> User:
        validate_user_name(name)
        if len(password) < MIN_PASSWORD_CHARS:
            raise AuthError(f"password: use at least {MIN_PASSWORD_CHARS} characters")
        users = dict(self._entries())
        if name in users and not replace:
            raise AuthError(f"user {name!r} already exists (use --replace to set a new password)")
        users[name] = {"hash": hash_password(password), "admin": admin}
        self._write(users)
        return User(name=name, is_admin=admin)

    def remove(self, name: str) -> None:
        users = dict(self._entries())
        if name not in users:
            raise AuthError(f"no user {name!r} in {self.path}")
        del users[name]
        self._write(users)

    def _write(self, users: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # The file holds password hashes: readable by its owner only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(tomli_w.dumps({"users": users}))
        os.replace(tmp, self.path)
        with self._lock:
            self._cache = None


class Accounts:
    """Resolves the signed-in user of a request; single-user (local admin) without a users file."""

    def __init__(self, users_file: UsersFile | None) -> None:
        self.users_file = users_file

    @property
    def enabled(self) -> bool:
        return self.users_file is not None

    def user(self, username: str | None) -> User:
        """The User behind `request.username`; raises AccessDenied when login is on and it is missing."""
        if self.users_file is None:
            return User(name=LOCAL_USER, is_admin=True)
        if not username:
            raise AccessDenied("not signed in")
        user = self.users_file.get(username)
        if user is None:
            raise AccessDenied(f"user {username!r} no longer exists")
        return user

    def check_owner(self, user: User, owner: str | None, what: str) -> None:
        if not user.can_access(owner):
            # Same words as for a missing object: do not reveal that another user's object exists.
            raise AccessDenied(f"{what} not found")
