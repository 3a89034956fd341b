"""Guards against collectives on a tensor whose device differs from the process group's device.

Under NCCL every collective needs a tensor on the rank's GPU; a CPU tensor fails with "No backend
type associated with device type cpu". CPU ranks (gloo) accept that CPU tensor, so CPU runs of the
trainer cannot show the bug: these tests check the routing instead. The GPU suite
(tests/gpu/test_training_jobs.py) runs the same helpers under NCCL on real GPUs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from engine.trainer import distributed
from engine.trainer.distributed import DistInfo, any_rank, barrier, broadcast_object, mean_over_ranks

ENGINE = Path(distributed.__file__).resolve().parents[1]


def _mentions_torch_distributed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                a.name == "distributed" for a in node.names):
            return True
        if (isinstance(node, ast.Attribute) and node.attr == "distributed"
                and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            return True
    return False


def test_only_the_distributed_module_uses_torch_distributed() -> None:
    offenders = [str(path.relative_to(ENGINE.parent)) for path in sorted(ENGINE.rglob("*.py"))
                 if path != Path(distributed.__file__).resolve()
                 and _mentions_torch_distributed(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == [], f"collectives outside engine/trainer/distributed.py: {offenders}"


def test_the_scan_finds_a_direct_collective() -> None:
    # The check above must be able to fail: the code shape of the bug the GPU run found.
    bug = "def f(flag):\n    t = torch.tensor([flag])\n    torch.distributed.all_reduce(t)\n"
    assert _mentions_torch_distributed(ast.parse(bug))
    assert _mentions_torch_distributed(ast.parse("import torch.distributed as dist\n"))
    assert not _mentions_torch_distributed(ast.parse("import torch\nx = torch.tensor([1])\n"))


class Collective(Exception):
    """Raised by the stand-in collectives with the device they were handed."""

    def __init__(self, device: torch.device | None) -> None:
        super().__init__(str(device))
        self.device = device


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    def all_reduce(tensor, op=None):  # noqa: ANN001, ARG001
        raise Collective(tensor.device)

    def broadcast_object_list(objects, src=0, group=None, device=None):  # noqa: ANN001, ARG001
        raise Collective(torch.device(device) if device is not None else None)

    def barrier_(group=None, async_op=False, device_ids=None):  # noqa: ANN001, ARG001
        raise Collective(torch.device("cuda", device_ids[0]) if device_ids else torch.device("cpu"))

    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    monkeypatch.setattr(tdist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(tdist, "barrier", barrier_)


# "meta" stands for a GPU: a device other than the CPU that this CPU-only torch can make tensors on.
@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("meta")])
def test_every_collective_runs_on_the_groups_device(recorded: None, device: torch.device) -> None:
    dist = DistInfo(rank=1, world_size=2, local_rank=1, device=device)
    for call in (lambda: any_rank([True, False], dist), lambda: mean_over_ranks(0.5, dist),
                 lambda: broadcast_object({"a": 1}, dist)):
        with pytest.raises(Collective) as seen:
            call()
        assert seen.value.device == device


def test_barrier_names_the_ranks_gpu(recorded: None) -> None:
    # NCCL otherwise guesses the device and warns (or hangs when ranks guess differently).
    with pytest.raises(Collective) as seen:
        barrier(DistInfo(rank=0, world_size=2, local_rank=1, device=torch.device("cuda", 1)))
    assert seen.value.device == torch.device("cuda", 1)


def test_one_rank_needs_no_collective(recorded: None) -> None:
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    assert any_rank([False, True], dist) == [False, True]
    assert mean_over_ranks(0.25, dist) == 0.25
    assert broadcast_object("x", dist) == "x"
    barrier(dist)


def test_a_group_without_a_cpu_backend_rejects_cpu_tensors_as_nccl_does() -> None:
    """Why the helpers matter: a group that serves only GPUs (as NCCL does) refuses a CPU tensor
    with the error the two-GPU studio job died of."""
    store = tdist.HashStore()
    tdist.init_process_group(backend="cuda:gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            tdist.all_reduce(torch.tensor([1], dtype=torch.int32))
    finally:
        tdist.destroy_process_group()
