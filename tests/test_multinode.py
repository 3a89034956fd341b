"""Two "nodes" on this machine: two studio homes, one `python -m studio train --follow` each, joined
into ONE training run by DeepSpeed's --no_ssh mode (one launcher per node), then stopped and
resumed from its checkpoint the same way. What a Slurm job (examples/slurm_multinode.sbatch) does.

Heavy (`make test-heavy`): two launches over both nodes, about 45 s of a 2-core machine; the GPU
suite runs this same test on two GPUs (tests/gpu/test_multinode_gpus.py), and the default suite stops
and resumes two CPU ranks under one launcher (tests/test_trainer_deepspeed.py, tests/test_engine_deepspeed.py)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.families.wan_random import build_random_wan
from engine.gpus import GpuInventory
from engine.launcher import signal_group
from engine.paths import DataLayout
from engine.store.db import Database
from engine.store.jobs import JobStore
from tests.trainer_support import REPO_ROOT, make_dataset, of_kind, read_events, write_config

TIMEOUT_S = 240


def node_env(hostfile: Path, rank: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("STUDIO_HOME", None)
    # The trainer sizes its threads per node (LOCAL_SIZE), but here two nodes share the machine.
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", STUDIO_HOSTFILE=str(hostfile),
               STUDIO_NODE_RANK=str(rank), STUDIO_MASTER_ADDR="127.0.0.1", STUDIO_MASTER_PORT=str(port),
               # Slot 0 of node0 and slot 1 of node1: two GPUs of one machine would be split like this.
               STUDIO_DEEPSPEED_INCLUDE="node0:0@node1:1")
    return env


def studio(home: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "studio", "--home", str(home), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
    deadline = time.monotonic() + timeout
    return [proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for proc in procs]


def logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(run_dir.glob("train*.log")))


def kill_trainers(homes: list[Path]) -> None:
    """Trainers live in their own sessions: a failed test must not leave them waiting for a peer."""
    for home in homes:
        if DataLayout(home).db_path.is_file():
            for job in JobStore(Database(DataLayout(home).db_path)).active():
                if job.pid:
                    signal_group(job.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.heavy
def test_two_nodes_without_ssh_train_one_run_stop_and_resume(tmp_path: Path, port: int) -> None:
    model = build_random_wan(tmp_path / "tiny_wan", preset="tiny", seed=1)
    data = make_dataset(tmp_path / "data", images=8, video=False, corrupt_video=False, uncaptioned=False)
    # 8 samples over 2 ranks -> 4 steps per epoch, 4 epochs = 16 steps.
    config = write_config(tmp_path, model, data, epochs=4, zero_stage=1)
    # No cache_dir: the studio puts the cache into the shared run dir (each node's home is its own).
    config.write_text(re.sub(r"^cache_dir = .*\n", "", config.read_text(), flags=re.M))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")  # the include keeps one slot of each
    shared = tmp_path / "shared_run"  # on a cluster: a shared filesystem
    homes = [tmp_path / "home0", tmp_path / "home1"]  # on a cluster: each node's local disk
    envs = [node_env(hostfile, rank, port) for rank in (0, 1)]
    procs: list[subprocess.Popen] = []
    try:
        procs = [studio(home, env, "train", str(config), "--run-dir", str(shared), "--follow")
                 for home, env in zip(homes, envs)]
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e["event"] == "step" and e["step"] >= 2 for e in read_events(shared)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(shared)
            time.sleep(0.05)
        (shared / "stop").touch()  # what `jobs stop` on node 0 writes
        outputs = finish(procs)
        assert [p.returncode for p in procs] == [0, 0], (outputs, logs(shared))
        job_ids = [int(re.search(r"job (\d+) queued", out).group(1)) for out in outputs]
        jobs = [JobStore(Database(DataLayout(home).db_path)).get(i) for home, i in zip(homes, job_ids)]
        assert [(j.status.value, j.run_dir, j.master_port) for j in jobs] == [
            ("stopped", str(shared.resolve()), port)] * 2  # the agreed port, not a random one
        events = read_events(shared)
        start = of_kind(events, "start")[0]
        assert start["world_size"] == 2 and start["total_steps"] == 16  # one run over both nodes
        stop_step = of_kind(events, "stopped")[-1]["step"]
        assert 2 <= stop_step < 16 and (shared / f"global_step{stop_step}" / "complete.json").is_file()
        assert len(list((shared / "cache").glob("*/latents/*.safetensors"))) == 8  # both nodes' shares
        assert {p.name for p in (shared / f"global_step{stop_step}").glob("*optim_states.pt")} == {
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
        # The run dir is shared; the logs are not (node 1 writes its own next to node 0's).
        assert "--include node0:0@node1:1 --master_addr 127.0.0.1 --no_ssh --node_rank 0" in (
            shared / "train.log").read_text()
        assert "--no_ssh --node_rank 1" in (shared / "train.node1.log").read_text()
        if len(GpuInventory(ttl_s=0).list()) >= 2:  # on a GPU machine (the GPU suite runs this test too)
            assert "Setting CUDA_VISIBLE_DEVICES=0" in (shared / "train.log").read_text()
            assert "Setting CUDA_VISIBLE_DEVICES=1" in (shared / "train.node1.log").read_text()

        procs = [studio(home, env, "jobs", "resume", str(job_id), "--follow")
                 for home, env, job_id in zip(homes, envs, job_ids)]
        outputs = finish(procs)
        assert [p.returncode for p in procs] == [0, 0], (outputs, logs(shared))
        assert [JobStore(Database(DataLayout(home).db_path)).get(i).status.value
                for home, i in zip(homes, job_ids)] == ["succeeded"] * 2
        events = read_events(shared)
        resumed = of_kind(events, "start")[-1]
        assert resumed["world_size"] == 2 and resumed["resumed_from_step"] == stop_step
        after = [e["step"] for e in of_kind(events, "step") if e["time"] >= resumed["time"]]
        assert after == list(range(stop_step + 1, 17))
        assert events[-1]["event"] == "done" and events[-1]["step"] == 16
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        kill_trainers(homes)
