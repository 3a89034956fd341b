from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from studio.settings import SettingsError, add_settings_arguments, load_settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_without_env() -> None:
    settings = load_settings(parse([]), env={})
    assert settings.home == Path("studio_data")
    assert (settings.host, settings.port, settings.cpu_slots) == ("127.0.0.1", 7860, 1)


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text('port = 8001\nhost = "0.0.0.0"\ncpu_slots = 3\n')
    env = {"STUDIO_SETTINGS": str(file), "STUDIO_PORT": "8002", "STUDIO_HOME": str(tmp_path)}
    settings = load_settings(parse(["--port", "8003"]), env=env)
    assert settings.port == 8003
    assert settings.host == "0.0.0.0"
    assert settings.cpu_slots == 3
    assert settings.home == tmp_path


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["--port", "70000"], {}, "port"),
        (["--port", "abc"], {}, "port"),
        ([], {"STUDIO_CPU_SLOTS": "0"}, "cpu_slots"),
        ([], {"STUDIO_LOG_LEVEL": "LOUD"}, "log_level"),
        (["--auth-file", "/nonexistent/users.toml"], {}, "auth_file"),
        (["--share"], {}, "share"),
        (["--allowed-roots", "/nonexistent-root"], {}, "allowed_roots"),
        (["--infer-step-cache", "1.5"], {}, "infer_step_cache"),
        ([], {"STUDIO_INFER_STEP_CACHE": "fast"}, "infer_step_cache"),
        ([], {"STUDIO_INFER_COMPILE_BLOCKS": "maybe"}, "infer_compile_blocks"),
        (["--infer-attention", "flash9"], {}, "infer_attention"),
    ],
)
def test_invalid_values_name_the_setting(argv: list[str], env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(parse(argv), env=env)
    assert str(info.value).startswith(names)


def test_type_errors_name_the_source_and_the_value(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text('port = "x"\n')
    cases = [
        ((["--port", "abc"], {}), "port (from --port): expected an integer, got 'abc'"),
        (([], {"GRADIO_SERVER_PORT": "x"}), "port (from GRADIO_SERVER_PORT): expected an integer, got 'x'"),
        (([], {"STUDIO_SETTINGS": str(file)}), f"port (from {file}): expected an integer, got 'x'"),
        (([], {"STUDIO_POLL_INTERVAL_S": "x"}), "poll_interval_s (from STUDIO_POLL_INTERVAL_S): expected a number, got 'x'"),
    ]
    for (argv, env), message in cases:
        with pytest.raises(SettingsError) as info:
            load_settings(parse(argv), env=env)
        assert str(info.value) == message


def test_shell_style_values(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"STUDIO_SHARE": "", "STUDIO_INFER_COMPILE_BLOCKS": "Yes", "STUDIO_AUTH_FILE": "", "STUDIO_HOME": "~/h",
           "STUDIO_ALLOWED_ROOTS": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"}
    settings = load_settings(parse([]), env=env)
    assert (settings.share, settings.infer_compile_blocks, settings.auth_file) == (False, True, None)
    assert settings.home == Path("~/h").expanduser()
    assert settings.allowed_roots == (tmp_path / "a", tmp_path / "b")
    # only the value that wins is read: a flag replaces a bad environment value
    assert load_settings(parse(["--port", "8003"]), env={"STUDIO_PORT": "abc"}).port == 8003


def test_unknown_key_in_settings_file(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting.*prot"):
        load_settings(parse(["--settings", str(file)]), env={})


def test_app_rejects_bad_setting_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "app.py", "--port", "0"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert result.returncode == 2
    assert "port: must be 1..65535" in result.stderr


def test_inference_speed_settings_reach_the_worker_command() -> None:
    settings = load_settings(parse(["--infer-compile-blocks", "--infer-step-cache", "0.08"]),
                             env={"STUDIO_INFER_ATTENTION": "flash3"})
    speed = settings.inference_speed()
    assert (speed.compile_blocks, speed.step_cache, speed.attention) == (True, 0.08, "flash3")
    assert speed.to_argv() == ["--compile-blocks", "--step-cache", "0.08", "--attention", "flash3"]
    assert load_settings(parse([]), env={}).inference_speed().to_argv() == []  # defaults change nothing


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nnode0 slots=2\nnode1 slots=2\n")
    return path


def test_node_settings_become_one_nodes_object(hostfile: Path) -> None:
    env = {"STUDIO_HOSTFILE": str(hostfile), "STUDIO_NODE_RANK": "1", "STUDIO_MASTER_ADDR": "10.0.0.1",
           "STUDIO_MASTER_PORT": "29400"}
    nodes = load_settings(parse(["--deepspeed-include", "node0:0@node1:1"]), env=env).nodes()
    assert nodes is not None and nodes.no_ssh
    assert (nodes.hostfile, nodes.node_rank, nodes.master_addr, nodes.master_port, nodes.include) == (
        hostfile, 1, "10.0.0.1", 29400, "node0:0@node1:1")
    ssh = load_settings(parse(["--hostfile", str(hostfile)]), env={}).nodes()
    assert ssh is not None and not ssh.no_ssh and ssh.master_port is None  # ssh mode keeps random ports
    assert load_settings(parse([]), env={}).nodes() is None
    assert load_settings(parse([]), env={"STUDIO_NODE_RANK": ""}).node_rank is None  # empty = unset


@pytest.mark.parametrize(
    ("argv", "hostfile_text", "name", "message"),
    [
        (["--node-rank", "0"], None, "node_rank", "set hostfile"),
        (["--master-port", "29400"], None, "master_port", "set hostfile"),
        (["--deepspeed-include", "node0:0"], None, "deepspeed_include", "set hostfile"),
        (["--node-rank", "0", "--master-port", "29400"], "node0 slots=1\n", "node_rank", "needs master_addr"),
        (["--node-rank", "0", "--master-addr", "n0"], "node0 slots=1\n", "node_rank", "needs master_port"),
        (["--node-rank", "2", "--master-addr", "n0", "--master-port", "29400"], "a slots=1\nb slots=1\n",
         "node_rank", "must be 0..1"),
        (["--node-rank", "-1", "--master-addr", "n0", "--master-port", "29400"], "a slots=1\n",
         "node_rank", "must be 0..0"),
        (["--node-rank", "1", "--master-addr", "n0", "--master-port", "29400", "--deepspeed-include", "b"],
         "a slots=1\nb slots=1\n", "node_rank", "kept by deepspeed_include"),
        (["--node-rank", "one"], "a slots=1\n", "node_rank", "(from --node-rank): expected an integer, got 'one'"),
        (["--master-port", "70000"], "a slots=1\n", "master_port", "1..65535"),
        (["--deepspeed-include", "c:0"], "a slots=1\n", "deepspeed_include", "not in the hostfile"),
        ([], "", "hostfile", "lists no hosts"),
        ([], "a slots=1\nb\n", "hostfile", "line 2"),
        ([], None, "hostfile", "cannot read"),
    ],
)
def test_invalid_node_settings_name_the_setting(tmp_path: Path, argv: list[str], hostfile_text: str | None,
                                                name: str, message: str) -> None:
    path = tmp_path / "hostfile"
    if hostfile_text is not None:
        path.write_text(hostfile_text)
    if hostfile_text is not None or name == "hostfile":
        argv = [*argv, "--hostfile", str(path)]
    with pytest.raises(SettingsError) as info:
        load_settings(parse(argv), env={})
    assert str(info.value).startswith(name) and message in str(info.value), str(info.value)
