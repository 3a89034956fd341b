"""Process spawning, identity, group stop, ports and the DeepSpeed command line (real processes)."""
from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from engine.launcher import (LaunchSpec, Nodes, build_deepspeed_command, build_env, group_members,
                             included_hosts, is_same_process, pick_master_port, port_is_free, process_identity,
                             read_hostfile, spawn_process, stop_process_group)
from engine.paths import REPO_ROOT


def spec(tmp_path: Path, devices: tuple[int, ...], **kw) -> LaunchSpec:
    return LaunchSpec(job_id=1, job_name="x", run_dir=tmp_path / "runs" / "1-x", devices=devices,
                      master_port=29555, **kw)


def test_gpu_command_selects_devices_port_and_module(tmp_path: Path) -> None:
    argv = build_deepspeed_command(spec(tmp_path, (3, 1)))
    assert Path(argv[0]).name == "deepspeed"
    run_dir = tmp_path / "runs" / "1-x"
    assert argv[1:] == ["--include=localhost:1,3", "--master_port", "29555", "--module", "engine.trainer",
                        "--config", str(run_dir / "run.toml"), "--run-dir", str(run_dir)]


def test_cpu_command_uses_num_gpus_and_resume_flag(tmp_path: Path) -> None:
    argv = build_deepspeed_command(spec(tmp_path, (-1, -2), resume=True))
    assert argv[1:3] == ["--num_gpus", "2"] and argv[-1] == "--resume"
    assert not any(a.startswith("--include") for a in argv)


def test_hostfile_replaces_device_selection(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    argv = build_deepspeed_command(spec(tmp_path, (0,), nodes=Nodes(hostfile=hostfile)))
    assert argv[1:5] == ["--hostfile", str(hostfile), "--master_port", "29555"]  # ssh mode: DeepSpeed finds the rest
    assert not any(a.startswith("--include") or a in ("--num_gpus", "--no_ssh") for a in argv)
    assert spec(tmp_path, (0,), nodes=Nodes(hostfile=hostfile)).log_path.name == "train.log"


def test_no_ssh_node_with_include_uses_the_agreed_port(tmp_path: Path) -> None:
    nodes = Nodes(hostfile=tmp_path / "hostfile", node_rank=1, master_addr="10.0.0.1", master_port=29400,
                  include="node0:0@node1:1")
    assert nodes.no_ssh and not Nodes(hostfile=tmp_path / "hostfile").no_ssh
    one = spec(tmp_path, (-1,), nodes=nodes)  # the job's own port (29555) loses to the nodes' port
    argv = build_deepspeed_command(one)
    run_dir = tmp_path / "runs" / "1-x"
    assert argv[1:] == ["--hostfile", str(tmp_path / "hostfile"), "--include", "node0:0@node1:1",
                        "--master_addr", "10.0.0.1", "--no_ssh", "--node_rank", "1", "--master_port", "29400",
                        "--module", "engine.trainer", "--config", str(run_dir / "run.toml"), "--run-dir", str(run_dir)]
    assert one.log_path == run_dir / "train.node1.log"  # nodes > 0 never append to node 0's log


def test_hostfile_parsing(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\nnode0 slots=2\n  node1   slots=4  \n")
    hosts = read_hostfile(hostfile)
    assert hosts == {"node0": 2, "node1": 4} and list(hosts) == ["node0", "node1"]
    assert included_hosts(hosts, "node1:3@node0") == ["node0", "node1"]  # hostfile order, as DeepSpeed
    for text, message in (("", "lists no hosts"), ("# only\n", "lists no hosts"), ("node0\n", "line 1"),
                          ("a slots=1\na slots=2\n", "listed twice"), ("a slots=0\n", "slots >= 1")):
        hostfile.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_hostfile(hostfile)
    with pytest.raises(ValueError, match="cannot read"):
        read_hostfile(tmp_path / "missing")
    for include, message in (("node2", "not in the hostfile"), ("node0:2", "slots 0..1"), ("node0:a", "numbers")):
        with pytest.raises(ValueError, match=message):
            included_hosts({"node0": 2}, include)


def test_env_for_the_trainer(tmp_path: Path) -> None:
    env = build_env(spec(tmp_path, (0,), studio_home=tmp_path / "home"),
                    {"PYTHONPATH": "/elsewhere", "CUDA_VISIBLE_DEVICES": "5", "KEEP": "1"})
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"]
    assert env["STUDIO_HOME"] == str(tmp_path / "home") and env["KEEP"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env  # --include decides
    # nvidia-smi (the GPUs tab, the queue) numbers by PCI bus; CUDA must too, or --gpus 1 is another card.
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_spawn_logs_to_file_in_own_session(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "out.log"
    log_path.parent.mkdir()
    log_path.write_text("earlier\n")
    proc = spawn_process([sys.executable, "-c", "import os,sys; print('out', os.getsid(0) == os.getpid(), flush=True);"
                          "print('err', file=sys.stderr)"], cwd=tmp_path, env={"PATH": "/usr/bin"},
                         log_path=log_path)
    assert proc.wait(30) == 0
    assert log_path.read_text().splitlines() == ["earlier", "out True", "err"]


def test_spawn_with_pipes_for_a_worker(tmp_path: Path) -> None:
    import subprocess

    proc = spawn_process([sys.executable, "-c", "import sys; print(sys.stdin.readline().upper(), end='')"],
                         cwd=tmp_path, env={}, log_path=tmp_path / "w.log", stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    out, _ = proc.communicate(b"ping\n", timeout=30)
    assert out == b"PING\n"


def test_identity_guards_pid_reuse(tmp_path: Path) -> None:
    proc = spawn_process([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path, env={},
                         log_path=None)
    identity = process_identity(proc.pid)
    assert identity is not None and is_same_process(proc.pid, identity.start_time)
    assert not is_same_process(proc.pid, identity.start_time - 100)  # same pid, other process
    assert stop_process_group(proc.pid, grace_s=5)
    proc.wait(10)
    assert process_identity(proc.pid) is None


def test_stop_group_kills_children_that_ignore_sigterm(tmp_path: Path) -> None:
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); print('up', flush=True);"
            "time.sleep(600)")
    log_path = tmp_path / "g.log"
    proc = spawn_process([sys.executable, "-c", code], cwd=tmp_path, env={}, log_path=log_path)
    deadline = time.monotonic() + 30
    while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_members(proc.pid)) == 2
    started = time.monotonic()
    assert stop_process_group(proc.pid, grace_s=0.5, kill_wait_s=10)
    assert proc.wait(10) == -signal.SIGKILL
    assert not group_members(proc.pid)
    assert time.monotonic() - started < 10


def test_master_port_is_free_and_not_taken_by_another_job() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not port_is_free(taken)
        assert pick_master_port(exclude=set(), port_range=(taken, taken + 1)) == taken + 1
    assert pick_master_port(exclude={40001}, port_range=(40001, 40002)) == 40002
    with pytest.raises(RuntimeError, match="no free master port"):
        pick_master_port(exclude={40001}, port_range=(40001, 40001))
