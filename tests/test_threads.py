"""One CPU thread policy: compute processes never ask for more threads than their share of the cores."""

import pytest

from engine.threads import cpu_threads


@pytest.fixture(autouse=True)
def no_omp_override(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_two_cores_give_every_compute_process_one_thread():
    assert cpu_threads("inference", cores=2) == 1
    assert cpu_threads("trainer", cores=2) == 1
    assert cpu_threads("trainer", ranks=2, cores=2) == 1


def test_a_training_job_and_a_generation_at_once_stay_within_the_cores():
    for cores in (2, 4, 8, 16, 64):
        for ranks in (1, 2, 4):
            training = ranks * cpu_threads("trainer", ranks=ranks, cores=cores)
            inference = cpu_threads("inference", cores=cores)
            assert training + inference <= max(cores, ranks + 1), (cores, ranks, training, inference)
    assert cpu_threads("trainer", cores=16) == 7 and cpu_threads("trainer", ranks=2, cores=16) == 3
    assert cpu_threads("inference", cores=16) == 7


def test_an_explicit_omp_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads("inference", cores=2) == 3 and cpu_threads("trainer", ranks=2, cores=64) == 3


def test_a_trainer_alone_takes_every_core_and_shares_the_machine_otherwise():
    assert cpu_threads("trainer", cores=2, alone=True) == 2
    assert cpu_threads("trainer", ranks=2, cores=2, alone=True) == 1
    assert cpu_threads("trainer", cores=16, alone=True) == 16 and cpu_threads("trainer", ranks=4, cores=16, alone=True) == 4


def test_compute_marks_count_other_live_processes_and_drop_dead_ones(tmp_path):
    import subprocess
    import sys

    from engine.threads import ComputeMark, others_computing

    shared = tmp_path / "marks"
    with ComputeMark("trainer", group="job1", directory=shared):
        assert shared.stat().st_mode & 0o1777 == 0o1777  # every user's processes mark in the same folder
        assert others_computing("job1", shared) == 0  # a job's own ranks are not others
        assert others_computing("job2", shared) == 1
        with ComputeMark("inference", directory=shared):
            assert others_computing("job1", shared) == 1
    assert others_computing("job2", shared) == 0 and not list(shared.iterdir())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = shared / f"inference-{dead.stdout.strip()}-{dead.stdout.strip()}"
    stale.touch()  # a worker killed mid-generation leaves its mark behind
    assert others_computing("job1", shared) == 0 and not stale.exists()


def test_another_users_stale_mark_is_skipped_not_fatal(tmp_path, monkeypatch):
    """In the sticky folder only the owner may remove a mark (root, running the tests, may remove any, so
    the refusal is the one Path.unlink gives another user): the reading trainer carries on."""
    import subprocess
    import sys
    from pathlib import Path

    from engine.threads import others_computing

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"inference-{dead.stdout.strip()}-{dead.stdout.strip()}"
    stale.touch()

    def refused(self, missing_ok=False):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    assert others_computing("job1", tmp_path) == 0 and stale.exists()


def test_a_trainer_gives_back_its_extra_cores_while_a_generation_runs(tmp_path):
    import torch

    from engine.threads import ComputeMark, TrainerThreads

    before = torch.get_num_threads()
    threads = TrainerThreads(ranks=1, group="job1", directory=tmp_path)
    try:
        alone = threads.threads
        assert torch.get_num_threads() == alone == cpu_threads("trainer", alone=True)
        with ComputeMark("inference", directory=tmp_path):
            assert threads.update() == cpu_threads("trainer") == torch.get_num_threads()
        assert threads.update() == alone == torch.get_num_threads()
        assert [p.name.split("-")[:2] for p in tmp_path.iterdir()] == [["trainer", "job1"]]
    finally:
        threads.close()
        torch.set_num_threads(before)
    assert not list(tmp_path.iterdir())


def test_the_worker_marks_a_cpu_generation_and_not_a_gpu_one():
    from types import SimpleNamespace

    import torch

    from engine.inference.worker import Worker
    from engine.threads import ComputeMark

    with Worker.computing(SimpleNamespace(device=torch.device("cpu"))) as mark:
        assert isinstance(mark, ComputeMark) and mark.path.exists() and mark.path.name.startswith("inference-")
    assert not mark.path.exists()
    with Worker.computing(SimpleNamespace(device=torch.device("cuda", 0))) as nothing:
        assert nothing is None
