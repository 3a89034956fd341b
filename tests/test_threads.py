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
