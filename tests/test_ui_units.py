"""Studio helpers without a browser: safe zip import, dataset confinement and checks, the config form
binding by key path, and the loss chart."""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from engine.config import TrainConfig
from engine.config_fields import config_fields
from engine.config import DatasetConfig, DirectoryConfig
from studio.datasets import DatasetError, check, confine, import_uploads, safe_extract_zip, save_caption
from studio.plots import ema_smooth, loss_figure
from studio.widgets import value_to_widget, widget_to_value


def make_zip(path: Path, entries: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs/x.png", "a/../../b.png", "C:/win.png"])
def test_zip_with_unsafe_entry_is_refused_before_writing(tmp_path: Path, bad: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"ok.png": b"x", bad: b"y"})
    dest = tmp_path / "out"
    with pytest.raises(DatasetError, match="unsafe entry"):
        safe_extract_zip(archive, dest, max_bytes=10_000)
    assert not dest.exists() or not any(dest.rglob("*"))
    assert not (tmp_path / "escape.txt").exists()


def test_zip_symlink_and_size_limit_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="symbolic link"):
        safe_extract_zip(make_zip(tmp_path / "l.zip", {"a.txt": b"x"}, link="link.png"), tmp_path / "o", 10_000)
    with pytest.raises(DatasetError, match="over the"):
        safe_extract_zip(make_zip(tmp_path / "big.zip", {"a.png": b"0" * 5000}), tmp_path / "o2", 1000)


def test_import_scan_and_check(tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (32, 24), "red").save(src / "red.png")
    (src / "red.txt").write_text("a red square")
    Image.new("RGB", (8, 8), "blue").save(src / "blue.png")
    (src / "broken.png").write_bytes(b"not a png")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"inner/{f.name}")
    dest = tmp_path / "root" / "ds"
    written = import_uploads([str(archive)], dest, max_bytes=1 << 20)
    assert {p.name for p in written} == {"red.png", "red.txt", "blue.png", "broken.png"}
    with pytest.raises(DatasetError, match="not an image"):
        import_uploads([str(tmp_path / "x.exe")], dest, 1 << 20)
    # A "compress folder" zip: everything one folder down, found by the same plan the trainer follows.
    found = check(DatasetConfig(directory=[DirectoryConfig(path=str(dest))], frame_buckets=[1, 17]))
    files = {f["file"]: f for f in found["files"]}
    assert files["inner/red.png"]["caption"] == "a red square" and files["inner/red.png"]["size"] == "32x24"
    assert files["inner/broken.png"]["skipped"].startswith("unreadable")
    assert found["trainable"] and found["samples"] == 2
    assert any("no caption" in w and "inner/blue.png" in w for w in found["warnings"])
    save_caption(dest, "inner/blue.png", "a blue square")
    assert (dest / "inner" / "blue.txt").read_text().strip() == "a blue square"
    with pytest.raises(DatasetError):
        save_caption(dest, "../../etc/passwd.png", "x")


def test_dataset_folder_confined_to_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ds").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (root / "escape").symlink_to(tmp_path / "other")
    assert confine(str(root / "ds"), (root.resolve(),)) == (root / "ds").resolve()
    for outside in (tmp_path / "other", root / "ds" / ".." / "..", root / "escape", Path("/etc")):
        with pytest.raises(DatasetError, match="outside the allowed"):
            confine(str(outside), (root.resolve(),))


def test_form_values_round_trip_by_key_path() -> None:
    cfg = TrainConfig(output_dir="runs").with_value("optimizer.lr", 3e-4).with_value("dataset.frame_buckets", [1, 33])
    rebuilt = TrainConfig(output_dir="runs")
    for spec in config_fields():
        if spec.path == "output_dir":
            continue
        shown = value_to_widget(spec, cfg.get(spec.path))
        rebuilt = rebuilt.with_value(spec.path, widget_to_value(spec, shown))
    assert rebuilt.to_toml() == cfg.to_toml()
    lists = {s.path: s for s in config_fields()}
    assert widget_to_value(lists["dataset.frame_buckets"], "1, 17,33") == [1, 17, 33]
    assert widget_to_value(lists["max_steps"], "") is None


def test_loss_figure_has_raw_smoothed_lr_and_epoch_marks() -> None:
    series = {"step": [1, 2, 3, 4], "loss": [1.0, 0.5, 0.4, 0.2], "lr": [1e-4] * 4, "epoch_steps": [2, 4]}
    fig = loss_figure(series)
    assert [t.name for t in fig.data] == ["loss", "smoothed", "lr"]
    assert fig.data[2].yaxis == "y2" and len(fig.layout.shapes) == 2
    smoothed = ema_smooth([1.0, 1.0, 1.0])
    assert smoothed == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards zero
    assert len(loss_figure(None).data) == 0
    with_eval = loss_figure({**series, "eval": {"held_out": {"step": [2, 4], "loss": [0.6, 0.5]}}})
    assert [t.name for t in with_eval.data][-1] == "eval loss (held_out)" and list(with_eval.data[-1].y) == [0.6, 0.5]


def test_gpu_status_lists_gpus_and_hides_other_users_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.jobs import JobStatus
    from engine.store.jobs import JobStore
    from studio.api import StudioApi
    from studio.auth import User
    from studio.context import StudioContext
    from studio.settings import StudioSettings
    from tabs.gpus import _gpu_row, _host_line

    fixture = Path(__file__).parent / "fixtures" / "nvidia_smi" / "h100_x8.txt"
    fake = tmp_path / "bin" / "nvidia-smi"  # the external tool, replayed from a recorded output
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat '{fixture}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    ctx = StudioContext.create(StudioSettings(home=tmp_path / "home").validate(), start=False)
    try:
        JobStore(ctx.db).insert(kind="train", name="big", owner="alice", status=JobStatus.RUNNING,
                                gpus_assigned=[0, 1])
        api = StudioApi(ctx)
        mine = api.gpu_status(User("alice"))
        theirs = api.gpu_status(User("bob"))
        assert len(mine["gpus"]) == 8 and mine["host_ram_total_gib"] > 0 and mine["disk_free_gib"] > 0
        assert mine["gpus"][0]["job"].endswith("big (alice)")
        assert theirs["gpus"][1]["job"] == "in use (another user)" and theirs["gpus"][2]["job"] == ""
        assert mine["flash_attention_3"] is False  # not installed on this machine
        assert "FlashAttention-3** not installed (`make flash3`" in _host_line(mine)
        row = _gpu_row(theirs["gpus"][2])
        assert row[0] == 2 and "H100" in row[1] and row[-1] == "free"
        assert len(ctx.gpu_history.snapshot()) == 8
    finally:
        ctx.close()


def test_gpus_tab_on_a_cpu_machine_names_each_slot_holder_and_charts_the_host(tmp_path: Path) -> None:
    from engine.jobs import JobStatus
    from engine.store.jobs import JobStore
    from studio.api import StudioApi
    from studio.auth import User
    from studio.context import StudioContext
    from studio.plots import gpu_history_figure
    from studio.settings import StudioSettings
    from tabs.gpus import machine_view

    ctx = StudioContext.create(StudioSettings(home=tmp_path / "home", cpu_slots=2).validate(), start=False)
    try:
        ctx.gpus.list = lambda: []  # this test's machine: no GPU, whatever the host has
        JobStore(ctx.db).insert(kind="train", name="cpu-run", owner="alice", status=JobStatus.RUNNING,
                                gpus_assigned=[-1])
        api = StudioApi(ctx)
        line, gpu_rows, slot_rows, figure = machine_view(ctx, api.gpu_status(User("bob")))
        assert gpu_rows == [] and slot_rows == [["CPU slot 1", "in use (another user)"], ["CPU slot 2", "free"]]
        assert "**CPU load**" in line and "cores" in line
        assert [t.name for t in figure.data] == ["host", "host"]  # CPU load and RAM panels
        assert machine_view(ctx, api.gpu_status(User("alice")))[2][0] == ["CPU slot 1", "#1 cpu-run (alice)"]
    finally:
        ctx.close()
    samples = [{"time": t, "util": 50.0, "mem": 20.0, "power": 300.0} for t in (1.0, 2.0)]
    fig = gpu_history_figure({0: samples, 1: samples})
    assert len(fig.data) == 6 and {t.name for t in fig.data} == {"GPU 0", "GPU 1"}  # 3 panels x 2 GPUs
    assert [a.text for a in fig.layout.annotations] == ["utilization %", "memory %", "power W"]
