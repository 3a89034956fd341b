"""Numbers and ids from outside are taken only when whole and in range, with a message naming the field
(job id 1.5 once acted on job 1; 10**20 overflowed inside SQLite; seed "abc" was compared with 0)."""
from __future__ import annotations

import pytest

from engine.jobs import JobError, parse_job_id
from engine.numbers import SQLITE_INT_MAX, whole_number
from studio.api import StudioApi
from studio.auth import AccessDenied, User

ALICE = User("alice")


@pytest.mark.parametrize("value, expected", [(7, 7), (7.0, 7), ("7", 7), (" 12 ", 12), (SQLITE_INT_MAX, SQLITE_INT_MAX)])
def test_whole_numbers_are_taken(value, expected) -> None:
    assert parse_job_id(value) == expected


@pytest.mark.parametrize("value, reason", [
    (1.5, "whole number"), ("1.5", "whole number"), ("abc", "whole number"), (True, "whole number"),
    (None, "whole number"), (0, "in [1,"), (-3, "in [1,"), (10**20, "in [1,"), (float("inf"), "whole number"),
])
def test_anything_else_is_refused_with_the_reason(value, reason) -> None:
    with pytest.raises(JobError, match="job id must be") as err:
        parse_job_id(value)
    assert reason in str(err.value)
    with pytest.raises(ValueError):
        whole_number(value, 1, SQLITE_INT_MAX)


def test_the_api_names_the_field_and_never_acts_on_a_rounded_id(api: StudioApi) -> None:
    with pytest.raises(JobError, match="job id must be a whole number, got 1.5"):
        api.control_job(ALICE, 1.5, "stop")
    with pytest.raises(AccessDenied, match="job 1 not found"):
        api.job_status(ALICE, "1")
    with pytest.raises(ValueError, match="limit: must be a whole number"):
        api.list_jobs(ALICE, limit="abc")
    with pytest.raises(ValueError, match="offset: must be in"):
        api.list_jobs(ALICE, offset=-1)
    assert api.list_jobs(ALICE, limit=10**6) == []  # a big page is clamped, not an error


def test_batch_sizes_repeats_and_frames_have_bounds(api: StudioApi) -> None:
    from engine.config import ConfigError, TrainConfig
    from engine.dataset import DatasetError
    from tests.ui_support import train_toml, write_dataset

    dataset = write_dataset(api.ctx.layout.home, count=3)
    text = train_toml("demo", dataset)
    for key, value, table in (("micro_batch_size_per_gpu", 10**20, ""), ("gradient_accumulation_steps", 5000, ""),
                              ("num_repeats", 10**9, "dataset.directory[0]."), ("frame_buckets", [2049], "dataset.")):
        toml = text.replace("[model]", f"{key} = {value}\n[model]") if not table else (
            text.replace("num_repeats = 1", f"num_repeats = {value}") if key == "num_repeats"
            else text.replace("frame_buckets = [1, 17]", f"frame_buckets = {value}"))
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_toml_string(toml).validate()
        assert any(path.startswith(f"{table}{key}") for path in err.value.paths), err.value
    # From the data: 3 clips, 1 per bucket at most 3 -> a micro batch of 8 could never be filled.
    with pytest.raises(DatasetError, match="micro_batch_size_per_gpu = 8.*lower it to at most"):
        api.start_training(ALICE, text.replace("[model]", "micro_batch_size_per_gpu = 8\n[model]"))
    assert api.list_jobs(ALICE) == []  # refused before queueing
