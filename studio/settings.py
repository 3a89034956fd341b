"""StudioSettings: one typed place for how the studio runs.

Sources, strongest first: command-line flags, environment (STUDIO_*), a TOML settings file
(--settings or STUDIO_SETTINGS), defaults. Invalid values stop the start with a message naming
the setting and where it came from.
"""
from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from engine.inference.speed import InferenceSpeed
from engine.launcher import Nodes, included_hosts, read_hostfile

ENV_PREFIX = "STUDIO_"


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it."""


# Flags and environment variables are strings: pydantic's lax mode reads "8001", "yes" and "0.05";
# these add what a shell user expects beyond that: ~ in paths, an empty value for "unset" / off, and
# a path list separated like PATH.
UserPath = Annotated[Path, AfterValidator(Path.expanduser)]
BlankIsUnset = BeforeValidator(lambda value: None if value == "" else value)
Switch = Annotated[bool, BeforeValidator(lambda value: False if value == "" else value)]


def _path_list(value: Any) -> Any:
    return [p for p in value.split(os.pathsep) if p] if isinstance(value, str) else value


class StudioSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    home: UserPath = Path("studio_data")
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: Annotated[UserPath | None, BlankIsUnset] = None
    allowed_roots: Annotated[tuple[UserPath, ...], BeforeValidator(_path_list)] = ()
    cpu_slots: int = 1
    max_upload_mb: int = 2048
    share: Switch = False
    log_level: str = "INFO"
    worker_idle_timeout_s: float = 600.0
    infer_compile_blocks: Switch = False  # torch.compile the transformer blocks in inference workers (CUDA)
    infer_step_cache: float = 0.0  # First Block Cache threshold for inference (0 = off; changes outputs)
    infer_attention: str = "default"  # attention kernel of inference workers: default | flash3 (Hopper)
    poll_interval_s: float = 1.0
    # DeepSpeed hostfile: jobs span its hosts (ssh/pdsh, or one launcher per node)
    hostfile: Annotated[UserPath | None, BlankIsUnset] = None
    # this machine's place in the hostfile: one launcher per node (--no_ssh)
    node_rank: Annotated[int | None, BlankIsUnset] = None
    master_addr: Annotated[str | None, BlankIsUnset] = None  # address of node 0, reachable from every node
    master_port: Annotated[int | None, BlankIsUnset] = None  # fixed rendezvous port: every node must use the same one
    # DeepSpeed --include filter over the hostfile, e.g. node0:0@node1:1
    deepspeed_include: Annotated[str | None, BlankIsUnset] = None

    @property
    def shared_dataset_roots(self) -> tuple[Path, ...]:
        """Dataset folders every user may read: the configured roots plus the studio's `datasets/`
        (the demo dataset). Uploads are per user (`studio.api.StudioApi.dataset_roots`)."""
        own = self.home / "datasets"
        return tuple(dict.fromkeys([*(p.resolve() for p in self.allowed_roots), own.resolve()]))

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


Sourced = dict[str, tuple[Any, str]]  # setting -> (raw value, where it came from)


def _from_toml(path: Path) -> Sourced:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path}: {exc}") from None
    known = StudioSettings.model_fields
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SettingsError(f"settings file {path}: unknown setting(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
    return {k: (v, str(path)) for k, v in data.items()}


def _from_env(env: dict[str, str]) -> Sourced:
    values: Sourced = {}
    # Spaces-style hosting sets GRADIO_SERVER_NAME/PORT; ours win when both are set.
    for name, key in (("host", "GRADIO_SERVER_NAME"), ("port", "GRADIO_SERVER_PORT")):
        if key in env:
            values[name] = (env[key], key)
    for name in StudioSettings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = (env[key], key)
    return values


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `python app.py` and `python -m studio ...`."""
    parser.add_argument("--settings", help="TOML file of settings (or STUDIO_SETTINGS)")
    parser.add_argument("--home", help="data directory (STUDIO_HOME, default ./studio_data)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", help="port to listen on (default 7860)")
    parser.add_argument("--auth-file", dest="auth_file", help="users TOML with scrypt hashes")
    parser.add_argument("--allowed-roots", dest="allowed_roots",
                        help=f"shared dataset folders every user may read, separated by '{os.pathsep}'")
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
    values: Sourced = {}
    settings_file = flags.pop("settings", None) or env.get("STUDIO_SETTINGS")
    if settings_file:
        values.update(_from_toml(Path(settings_file)))
    values.update(_from_env(env))
    for name, raw in flags.items():
        if name in StudioSettings.model_fields:
            values[name] = (raw, f"--{name.replace('_', '-')}")
    try:
        settings = StudioSettings.model_validate({name: raw for name, (raw, _) in values.items()})
    except ValidationError as exc:
        error = exc.errors()[0]  # one at a time, like the checks in validate()
        name = str(error["loc"][0])
        raise SettingsError(f"{name} (from {values[name][1]}): {_reason(error)}") from None
    return settings.validate()


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false, yes/no, on/off, 1/0)",
             "string": "a string", "path": "a path", "tuple": "a list of paths"}


def _reason(error: Any) -> str:
    expected = _EXPECTED.get(error["type"].split("_")[0])
    return f"expected {expected}, got {error['input']!r}" if expected else error["msg"]
