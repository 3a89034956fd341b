"""The `[sample]` table of the training config: videos drawn with the LoRA being trained, at save time.

    [sample]
    prompts = ["a purple star moving right on a white background"]
    seeds = [0, 1]
    every_n_epochs = 5          # which saves get samples (default: every save)
    at_start = true             # also before the first step (the base model's answer)
"""
from __future__ import annotations

from pydantic import Field

from engine.config_types import Bool, ConfigTable, Float, Int, Str

__all__ = ["SampleConfig", "sample_errors", "MAX_SAMPLE_VIDEOS"]

MAX_SAMPLE_VIDEOS = 32  # prompts x seeds per save: sampling must not dwarf training


class SampleConfig(ConfigTable):
    table_path = "sample."

    prompts: list[Str] = Field([], description="Prompts to sample at each sampled save.")
    negative_prompt: Str = Field("", description="Negative prompt for every sample.")
    seeds: list[Int] = Field([0], description="One video per prompt and seed (the same seeds every time).")
    width: Int | None = Field(None, description="Default: the dataset's first resolution.")
    height: Int | None = Field(None, description="Default: the width.")
    num_frames: Int | None = Field(None, description="Default: the dataset's largest frame bucket (4k+1).")
    steps: Int = Field(20, description="Denoising steps.")
    guidance_scale: Float = Field(5.0, description="Classifier-free guidance.")
    flow_shift: Float | None = Field(None, description="Default: the model's scheduler config.")
    fps: Int = Field(16, description="Frame rate of the written mp4.")
    every_n_epochs: Int | None = Field(None, description="Sample saves made at these epochs (default: every save).")
    every_n_steps: Int | None = Field(None, description="Sample saves made at these steps.")
    at_start: Bool = Field(False, description="Also sample before the first step.")


def sample_errors(s: SampleConfig, prefix: str = "sample") -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []

    def check(ok: bool, key: str, reason: str) -> None:
        if not ok:
            errors.append((f"{prefix}.{key}", reason))

    check(bool(s.prompts) and all(p.strip() for p in s.prompts), "prompts", "list at least one non-empty prompt")
    check(bool(s.seeds) and all(0 <= seed < 2**63 for seed in s.seeds), "seeds", "list seeds in [0, 2**63)")
    videos = len(s.prompts) * len(s.seeds)
    check(videos <= MAX_SAMPLE_VIDEOS, "prompts", f"{videos} videos per save (prompts x seeds); at most "
                                                  f"{MAX_SAMPLE_VIDEOS}")
    for key in ("width", "height"):
        value = getattr(s, key)
        check(value is None or (16 <= value <= 4096 and value % 16 == 0), key, "must be a multiple of 16 in [16, 4096]")
    check(s.num_frames is None or (1 <= s.num_frames <= 1025 and (s.num_frames - 1) % 4 == 0), "num_frames",
          "must be 4k+1 in [1, 1025]")
    check(1 <= s.steps <= 200, "steps", "must be in [1, 200]")
    check(0 <= s.guidance_scale <= 30, "guidance_scale", "must be in [0, 30]")
    check(s.flow_shift is None or 0 < s.flow_shift <= 20, "flow_shift", "must be in (0, 20]")
    check(1 <= s.fps <= 60, "fps", "must be in [1, 60]")
    for key in ("every_n_epochs", "every_n_steps"):
        value = getattr(s, key)
        check(value is None or value >= 1, key, "must be >= 1")
    return errors
