"""Studio training jobs on GPUs, driven through the CLI: the demo LoRA on one and two GPUs with
ZeRO-1 and ZeRO-2 (same losses for the same global batch), two jobs at once on disjoint GPUs, and
save-now / stop / resume of a two-GPU job."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu.support import (
    demo_config,
    events,
    explain,
    job,
    needs_gpus,
    of_kind,
    ok,
    queued_job_id,
    record,
    start_studio,
    step_losses,
    studio,
    wait_for,
    write_config,
)

pytestmark = needs_gpus(2)

STEPS = 8
# fp32 weights and activations on both sides; only the order of the gradient sum differs
# (one GPU accumulates two micro-batches, two GPUs all-reduce one each).
LOSS_RTOL = 1e-3


def demo_run_config(home: Path, name: str, **changes) -> Path:
    # Caption dropout at 0.5: the drops follow each micro-batch's global position like the noise, so two
    # GPUs must still match one GPU's losses; at 0.5 some of the 16 samples of 8 steps are surely dropped.
    return write_config(home / "configs" / f"{name}.toml", demo_config(home),
                        **{"max_steps": STEPS, "epochs": 100, "save_every_n_epochs": 1000, "seed": 7,
                           "caption_dropout_rate": 0.5, **changes})


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-jobs") / "home"


@pytest.fixture(scope="module")
def one_gpu_references(home: Path) -> dict[int, int]:
    """ZeRO-1 on GPU 0 and ZeRO-2 on GPU 1, at the same time: 1 GPU x 2 accumulated micro-batches.
    Returns {zero stage: job id}."""
    followers = {}
    for stage, gpu in ((1, "0"), (2, "1")):
        config = demo_run_config(home, f"ref-zero{stage}", zero_stage=stage, gradient_accumulation_steps=2)
        followers[stage] = start_studio(home, f"ref-zero{stage}.out", "train", str(config), "--gpus", gpu,
                                        "--name", f"ref-zero{stage}", "--follow")
    ids = {}
    for stage, process in followers.items():
        process.wait(timeout=900)
        output = (home / f"ref-zero{stage}.out").read_text()
        ids[stage] = queued_job_id(output)
        assert process.returncode == 0, explain(home, ids[stage])
    return ids


def test_two_one_gpu_jobs_run_at_once_on_disjoint_gpus(home: Path, one_gpu_references: dict[int, int]) -> None:
    first, second = (job(home, one_gpu_references[stage]) for stage in (1, 2))
    assert first.status.value == second.status.value == "succeeded"
    assert (first.gpus_assigned, second.gpus_assigned) == ([0], [1])
    # Both trainers were running at the same time.
    assert first.started_at < second.ended_at and second.started_at < first.ended_at
    for found in (first, second):
        steps = of_kind(events(found.run_dir), "step")
        assert len(steps) == STEPS
        assert all("peak_mem_gib" in s for s in steps), "the trainer did not run on a CUDA device"
    log = Path(second.log_path).read_text()
    assert "CUDA_VISIBLE_DEVICES=1" in log or "'localhost': [1]" in log, log[-3000:]


@pytest.mark.parametrize("stage", [1, 2])
def test_two_gpu_losses_match_one_gpu_with_the_same_global_batch(home: Path, one_gpu_references: dict[int, int],
                                                                 stage: int) -> None:
    config = demo_run_config(home, f"two-zero{stage}", zero_stage=stage, gradient_accumulation_steps=1)
    job_id = queued_job_id(ok(studio(home, "train", str(config), "--num-gpus", "2", "--name",
                                     f"two-zero{stage}", "--follow")))
    two = job(home, job_id)
    assert two.status.value == "succeeded" and sorted(two.gpus_assigned) == [0, 1], explain(home, job_id)
    assert of_kind(events(two.run_dir), "start")[0]["world_size"] == 2
    reference = step_losses(job(home, one_gpu_references[stage]).run_dir)
    losses = step_losses(two.run_dir)
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference)
    record(f"demo LoRA ZeRO-{stage}: 2 GPUs vs 1 GPU x 2 micro-batches", steps=STEPS,
           max_relative_loss_difference=worst, one_gpu=[reference[s] for s in sorted(reference)],
           two_gpus=[losses[s] for s in sorted(losses)])
    assert worst <= LOSS_RTOL, (reference, losses)
    assert (Path(two.run_dir) / f"step{STEPS}" / "adapter_model.safetensors").is_file() or any(
        Path(two.run_dir).glob("epoch*/adapter_model.safetensors"))


def test_save_now_stop_and_resume_on_two_gpus(home: Path) -> None:
    config = demo_run_config(home, "stop-resume", zero_stage=2, max_steps=600)
    job_id = queued_job_id(ok(studio(home, "train", str(config), "--num-gpus", "2", "--name", "stop-resume")))
    run_dir = Path(job(home, job_id).run_dir)

    def steps_done() -> int:
        return max((e["step"] for e in of_kind(events(run_dir), "step")), default=0)

    wait_for(lambda: steps_done() >= 5, 300, "5 steps of the two-GPU job")
    ok(studio(home, "jobs", "save", str(job_id)))
    saved = wait_for(lambda: of_kind(events(run_dir), "save"), 120, "the save-now LoRA")[0]
    assert (Path(saved["path"]) / "adapter_model.safetensors").is_file() and saved["step"] < 600
    ok(studio(home, "jobs", "stop", str(job_id)))
    stopped = job(home, job_id)
    assert stopped.status.value == "stopped", explain(home, job_id)
    stop_step = of_kind(events(run_dir), "stopped")[-1]["step"]
    assert stop_step < 600 and (run_dir / f"global_step{stop_step}" / "complete.json").is_file()

    ok(studio(home, "jobs", "resume", str(job_id), "--follow"))
    resumed = job(home, job_id)
    assert resumed.status.value == "succeeded", explain(home, job_id)
    starts = of_kind(events(run_dir), "start")
    assert starts[-1]["resumed_from_step"] == stop_step and starts[-1]["world_size"] == 2
    assert of_kind(events(run_dir), "done")[-1]["step"] == 600
    record("demo LoRA 2 GPUs ZeRO-2: save-now, stop, resume", save_step=saved["step"], stop_step=stop_step,
           finished_step=600)


def test_samples_during_a_two_gpu_job(home: Path) -> None:
    """[sample] on GPUs: rank 0 draws with the bf16 training transformer and its LoRA while rank 1 waits;
    the demo world's evaluator scores every save; the best save is named."""
    # The demo example samples every 10 epochs (CPU-sized); this run samples each of its saves.
    config = demo_run_config(home, "samples", max_steps=10, save_every_n_steps=5, sample={"every_n_steps": 5})
    job_id = queued_job_id(ok(studio(home, "train", str(config), "--num-gpus", "2", "--name", "samples",
                                     "--follow")))
    done = job(home, job_id)
    assert done.status.value == "succeeded", explain(home, job_id)
    found = events(done.run_dir)
    samples = of_kind(found, "sample")
    assert [s["label"] for s in samples] == ["start", "step5", "step10"], [e for e in found if e["event"] == "warning"]
    for sample in samples:
        assert set(sample["scores"]) == {"color", "shape", "motion", "present", "all"}
        assert all(Path(v["file"]).is_file() for v in sample["videos"])
    from tests.gpu.support import save_frames

    save_frames(Path(samples[-1]["videos"][0]["file"]), "samples-step10")
    record("demo LoRA 2 GPUs: samples at start and every save", seconds=[s["seconds"] for s in samples],
           scores={s["label"]: s["scores"] for s in samples},
           step_s=of_kind(found, "step")[-1]["elapsed_s"] / len(of_kind(found, "step")))
