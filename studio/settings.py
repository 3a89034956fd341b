"""StudioSettings: one typed place for how the studio runs.

Sources, strongest first: command-line flags, environment (STUDIO_*), a TOML settings file
(--settings or STUDIO_SETTINGS), defaults. Invalid values stop the start with a message naming
the setting and where it came from.
"""
from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.inference.speed import InferenceSpeed
from engine.launcher import Nodes, included_hosts, read_hostfile

ENV_PREFIX = "STUDIO_"


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it."""


@dataclass(frozen=True)
class StudioSettings:
    home: Path = Path("studio_data")
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: Path | None = None
    allowed_roots: tuple[Path, ...] = ()
    cpu_slots: int = 1
    max_upload_mb: int = 2048
    share: bool = False
    log_level: str = "INFO"
    worker_idle_timeout_s: float = 600.0
    infer_compile_blocks: bool = False  # torch.compile the transformer blocks in inference workers (CUDA)
    infer_step_cache: float = 0.0  # First Block Cache threshold for inference (0 = off; changes outputs)
    infer_attention: str = "default"  # attention kernel of inference workers: default | flash3 (Hopper)
    poll_interval_s: float = 1.0
    hostfile: Path | None = None  # DeepSpeed hostfile: jobs span its hosts (ssh/pdsh, or one launcher per node)
    node_rank: int | None = None  # this machine's place in the hostfile: one launcher per node (--no_ssh)
    master_addr: str | None = None  # address of node 0, reachable from every node
    master_port: int | None = None  # fixed rendezvous port: every node must use the same one
    deepspeed_include: str | None = None  # DeepSpeed --include filter over the hostfile, e.g. node0:0@node1:1

    @property
    def dataset_roots(self) -> tuple[Path, ...]:
        """Folders a dataset may come from: the configured roots plus the studio's own."""
        own = (self.home / "datasets", self.home / "uploads")
        return tuple(dict.fromkeys([*(p.resolve() for p in self.allowed_roots), *(p.resolve() for p in own)]))

    def inference_speed(self) -> InferenceSpeed:
        return InferenceSpeed(compile_blocks=self.infer_compile_blocks, step_cache=self.infer_step_cache,
                              attention=self.infer_attention)

    def nodes(self) -> Nodes | None:
        """How jobs span several machines; None: this machine only."""
        if self.hostfile is None:
            return None
        return Nodes(hostfile=self.hostfile, node_rank=self.node_rank, master_addr=self.master_addr,
                     master_port=self.master_port, include=self.deepspeed_include)

    def validate(self) -> "StudioSettings":
        _check(1 <= self.port <= 65535, "port", f"must be 1..65535, got {self.port}")
        _check(self.cpu_slots >= 1, "cpu_slots", f"must be >= 1, got {self.cpu_slots}")
        _check(self.max_upload_mb >= 1, "max_upload_mb", f"must be >= 1, got {self.max_upload_mb}")
        _check(self.worker_idle_timeout_s > 0, "worker_idle_timeout_s", "must be > 0")
        _check(self.poll_interval_s > 0, "poll_interval_s", "must be > 0")
        try:
            self.inference_speed()  # one bound for each setting and its worker flag
        except ValueError as exc:  # InferenceSpeed's messages start with the field's name
            raise SettingsError(f"infer_{str(exc).split()[0]}: {exc}") from None
        _check(self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}, "log_level",
               f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        _check(bool(self.host.strip()), "host", "must not be empty")
        if self.home.exists() and not self.home.is_dir():
            raise SettingsError(f"home: {self.home} exists and is not a directory")
        if self.auth_file is not None and not self.auth_file.is_file():
            raise SettingsError(
                f"auth_file: {self.auth_file} does not exist; create it with "
                f"`python -m studio users add NAME --auth-file {self.auth_file}`"
            )
        for root in self.allowed_roots:
            _check(root.is_dir(), "allowed_roots", f"{root} is not an existing directory")
        if self.share and self.auth_file is None:
            raise SettingsError("share: a public share link needs --auth-file (anyone could use your GPUs)")
        self._validate_nodes()
        return self

    def _validate_nodes(self) -> None:
        for name in ("node_rank", "master_addr", "master_port", "deepspeed_include"):
            _check(getattr(self, name) is None or self.hostfile is not None, name,
                   "only applies to several machines; set hostfile (STUDIO_HOSTFILE) too")
        if self.hostfile is None:
            return
        try:
            pool = read_hostfile(self.hostfile)
        except ValueError as exc:
            raise SettingsError(f"hostfile: {exc}") from None
        hosts = list(pool)
        if self.deepspeed_include is not None:
            try:
                hosts = included_hosts(pool, self.deepspeed_include)
            except ValueError as exc:
                raise SettingsError(f"deepspeed_include: {exc}") from None
        if self.master_port is not None:
            _check(1 <= self.master_port <= 65535, "master_port", f"must be 1..65535, got {self.master_port}")
        if self.master_addr is not None:
            _check(bool(self.master_addr.strip()), "master_addr", "must not be empty")
        if self.node_rank is None:
            return
        _check(0 <= self.node_rank < len(hosts), "node_rank",
               f"must be 0..{len(hosts) - 1} (the {len(hosts)} host(s) of {self.hostfile}"
               + (" kept by deepspeed_include" if self.deepspeed_include is not None else "")
               + f"), got {self.node_rank}")
        _check(self.master_addr is not None, "node_rank",
               "one launcher per node needs master_addr (STUDIO_MASTER_ADDR): the address of node 0")
        _check(self.master_port is not None, "node_rank",
               "one launcher per node needs master_port (STUDIO_MASTER_PORT), the same on every node")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SettingsError(f"{name}: {message}")


_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(StudioSettings)}


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value (str from env/flags, or TOML value) into the field's type."""
    kind = _FIELD_TYPES[name]
    if kind.endswith(" | None"):
        if str(raw) == "":
            return None
        kind = kind.removesuffix(" | None")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind == "Path":
            return Path(str(raw)).expanduser()
        if kind.startswith("tuple"):
            items = raw if isinstance(raw, list) else [p for p in str(raw).split(os.pathsep) if p]
            return tuple(Path(str(p)).expanduser() for p in items)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name} (from {source}): {exc}") from None


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path}: {exc}") from None
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise SettingsError(f"settings file {path}: unknown setting(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(_FIELD_TYPES))}")
    return {k: _convert(k, v, str(path)) for k, v in data.items()}


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    # Spaces-style hosting sets GRADIO_SERVER_NAME/PORT; ours win when both are set.
    if "GRADIO_SERVER_NAME" in env:
        values["host"] = env["GRADIO_SERVER_NAME"]
    if "GRADIO_SERVER_PORT" in env:
        values["port"] = _convert("port", env["GRADIO_SERVER_PORT"], "GRADIO_SERVER_PORT")
    for name in _FIELD_TYPES:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _convert(name, env[key], key)
    return values


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `python app.py` and `python -m studio ...`."""
    parser.add_argument("--settings", help="TOML file of settings (or STUDIO_SETTINGS)")
    parser.add_argument("--home", help="data directory (STUDIO_HOME, default ./studio_data)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", help="port to listen on (default 7860)")
    parser.add_argument("--auth-file", dest="auth_file", help="users TOML with scrypt hashes")
    parser.add_argument("--allowed-roots", dest="allowed_roots",
                        help=f"folders datasets may come from, separated by '{os.pathsep}'")
    parser.add_argument("--cpu-slots", dest="cpu_slots", help="parallel CPU jobs on a machine without GPUs")
    parser.add_argument("--share", action="store_true", default=None, help="public link (needs --auth-file)")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--infer-compile-blocks", dest="infer_compile_blocks", action="store_true", default=None,
                        help="torch.compile transformer blocks in inference workers (CUDA; same output)")
    parser.add_argument("--infer-step-cache", dest="infer_step_cache",
                        help="First Block Cache threshold for inference, e.g. 0.05 (faster, changes outputs)")
    parser.add_argument("--infer-attention", dest="infer_attention",
                        help="attention kernel of inference workers: default or flash3 (FlashAttention-3, Hopper)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' lines): jobs span its hosts")
    parser.add_argument("--node-rank", dest="node_rank",
                        help="this machine's place in the hostfile (0 = first); one launcher per node, no ssh")
    parser.add_argument("--master-addr", dest="master_addr", help="address of node 0 for multi-node jobs")
    parser.add_argument("--master-port", dest="master_port",
                        help="fixed rendezvous port of multi-node jobs (the same on every node)")
    parser.add_argument("--deepspeed-include", dest="deepspeed_include",
                        help="DeepSpeed --include filter over the hostfile, e.g. node0:0@node1:1")


def settings_flag_names() -> frozenset[str]:
    """The argparse names of the settings flags (what a CLI hands to `load_settings`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_settings_arguments(parser)
    return frozenset(action.dest for action in parser._actions)


def load_settings(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> StudioSettings:
    """Merge defaults < TOML file < environment < flags, then validate."""
    env = dict(os.environ if env is None else env)
    flags = {k: v for k, v in vars(args or argparse.Namespace()).items() if v is not None}
    values: dict[str, Any] = {}
    settings_file = flags.pop("settings", None) or env.get("STUDIO_SETTINGS")
    if settings_file:
        values.update(_from_toml(Path(settings_file)))
    values.update(_from_env(env))
    for name, raw in flags.items():
        if name in _FIELD_TYPES:
            values[name] = _convert(name, raw, f"--{name.replace('_', '-')}")
    return replace(StudioSettings(), **values).validate()
