"""The trainer's process group: joining it, and every collective the trainer uses.

Every collective goes through this module. Under NCCL a collective only accepts tensors on the
rank's own GPU ("No backend type associated with device type cpu" otherwise), under gloo only CPU
tensors: the helpers build their tensors on `DistInfo.device`, the device the group was set up
for, so the same code runs on CPU ranks and on GPUs. tests/test_distributed.py checks that no
other module calls torch.distributed collectives directly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist

from engine.threads import TrainerThreads


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # the compute device, and the device collectives run on
    # CPU ranks: their threads follow whether another studio process computes on the CPU (engine/threads.py)
    cpu_threads: TrainerThreads | None = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group DeepSpeed's launcher set up, or make a one-process group."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "WORLD_SIZE" not in os.environ:  # plain `python -m engine.trainer`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    on_cpu = get_accelerator().device_name() == "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU ranks (minutes on first run);
        # it only serves inference all-reduce, so training over gloo does not need it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device = torch.device("cpu")
        # CPU ranks share the cores with each other, the inference worker and the app (engine/threads.py).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])))
        # The job's ranks share a master address and port, and do not count each other as others.
        cpu_threads = TrainerThreads(local_world, group=os.environ["MASTER_PORT"])
    else:
        # Before the group exists: NCCL binds each rank to the current device.
        device = torch.device(get_accelerator().device_name(local_rank))
        get_accelerator().set_device(local_rank)
        cpu_threads = None
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=timedelta(hours=2))
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device, cpu_threads)


def close_distributed(dist: DistInfo) -> None:
    """Leave the group before the interpreter exits: a rank whose gloo/NCCL threads are still alive
    at exit can abort ("terminate called without an active exception", SIGABRT) after a clean run."""
    if dist.cpu_threads is not None:
        dist.cpu_threads.close()
    if tdist.is_initialized():
        barrier(dist)  # no rank tears its side down while another still talks to it
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broadcast_object(value: object, dist: DistInfo) -> object:
    """Rank 0's `value` on every rank (pickled; NCCL stages it through the current GPU)."""
    if dist.world_size == 1:
        return value
    holder = [value]
    tdist.broadcast_object_list(holder, src=0, device=dist.device)
    return holder[0]


def barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        tdist.barrier(device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def any_rank(flags: list[bool], dist: DistInfo) -> list[bool]:
    """Element-wise OR of `flags` over all ranks (one collective for several decisions)."""
    if dist.world_size == 1:
        return list(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=dist.device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return [bool(x) for x in tensor.tolist()]


def mean_over_ranks(value: float, dist: DistInfo) -> float:
    if dist.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(tensor)
    return float(tensor.item()) / dist.world_size
