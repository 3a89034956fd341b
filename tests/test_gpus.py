"""nvidia-smi parsing on recorded outputs, and the cached inventory."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from engine.gpus import GpuInventory, NvidiaSmiError, parse_nvidia_smi

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"


def test_eight_h100s() -> None:
    gpus = parse_nvidia_smi((FIXTURES / "h100_x8.txt").read_text())
    assert [g.index for g in gpus] == list(range(8))
    first = gpus[0]
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.uuid.startswith("GPU-4f1c2a8e")
    assert (first.memory_total_mib, first.memory_used_mib) == (81559, 71234)
    assert (first.utilization_pct, first.temperature_c, first.power_w) == (98, 67, 612.45)


def test_two_gpus_with_not_available_fields() -> None:
    gpus = parse_nvidia_smi((FIXTURES / "rtx_x2_na.txt").read_text())
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"]
    assert gpus[1].utilization_pct is None and gpus[1].power_w is None
    assert gpus[1].temperature_c == 38 and gpus[0].power_w == 87.21


@pytest.mark.parametrize("fixture", ["error_driver.txt", "no_devices.txt"])
def test_error_text_is_not_a_gpu_table(fixture: str) -> None:
    with pytest.raises(NvidiaSmiError, match="unexpected nvidia-smi output"):
        parse_nvidia_smi((FIXTURES / fixture).read_text())


def test_no_nvidia_smi_means_no_gpus() -> None:
    inventory = GpuInventory(command="/nonexistent/nvidia-smi")
    assert inventory.list() == []
    assert "did not run" in inventory.last_error


def fake_smi(tmp_path: Path, fixture: str, exit_code: int = 0) -> Path:
    """A recorded output replayed by a real executable, counting its calls."""
    script = tmp_path / "nvidia-smi"
    calls = tmp_path / "calls"
    script.write_text(f"#!/bin/sh\necho x >> {calls}\ncat {FIXTURES / fixture}\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_inventory_caches_between_queries(tmp_path: Path) -> None:
    inventory = GpuInventory(ttl_s=60, command=str(fake_smi(tmp_path, "h100_x8.txt")))
    assert len(inventory.list()) == 8
    assert [g.index for g in inventory.list()] == list(range(8))
    assert (tmp_path / "calls").read_text().count("x") == 1  # cached within the TTL
    fresh = GpuInventory(ttl_s=0, command=str(fake_smi(tmp_path, "h100_x8.txt")))
    fresh.list()
    fresh.list()
    assert (tmp_path / "calls").read_text().count("x") == 3


def test_failing_nvidia_smi_gives_no_gpus_and_a_reason(tmp_path: Path) -> None:
    inventory = GpuInventory(command=str(fake_smi(tmp_path, "error_driver.txt", exit_code=9)))
    assert inventory.list() == []
    assert "exited 9" in inventory.last_error and "NVIDIA driver" in inventory.last_error
