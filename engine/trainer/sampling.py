"""Sample videos during training (`[sample]`): drawn on rank 0 with the LoRA being trained, through the
same generation code as the inference worker (engine.inference.pipeline.generate), right after a save.

Memory: the prompts are encoded once at start, before the transformer is loaded, and the text encoder
is freed; rank 0 keeps only the VAE. The transformer is the one being trained (no second copy); its
LoRA is active as it stands at the save. Other ranks wait at a barrier. Time spent sampling is
reported in the `sample` event and is not part of the step times (speed, ETA). A failure to sample
is a `warning` event, never a failed run. Image-to-video runs start every sample from the first frame
of the first training clip, as the run trains; Wan2.1 I2V's CLIP image encoder stays on the CPU for it
(one image per video: about a second, and no GPU memory beside the transformer).
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import TrainConfig
from engine.config_sample import SampleConfig
from engine.families import ModelFamily
from engine.media import error_reason
from engine.rundir import RunDir
from engine.scoring import Scorer, mean_scores, scorer_for
from engine.trainer.distributed import DistInfo, barrier
from engine.trainer.runfiles import MetricsWriter

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, cfg: TrainConfig, model_dir: Path, family: ModelFamily, dist: DistInfo,
                 events: MetricsWriter, run_dir: Path, encoder_dtype: torch.dtype, image_mode: str = "none",
                 start_from: Any = None) -> None:
        self.cfg, self.model_dir, self.family, self.dist, self.events = cfg, model_dir, family, dist, events
        self.image_mode = image_mode
        self.start_from = start_from  # image-to-video: the training sample whose first frame starts each video
        self.start: dict[str, Any] = {}  # generate()'s `image`: its first frame
        self.image_encoder: tuple[Any, Any] = (None, None)  # Wan2.1 I2V: (CLIP vision encoder, its processor)
        self.encoder_dtype = encoder_dtype  # as the latent cache encodes captions
        self.files = RunDir(run_dir)
        self.settings: SampleConfig | None = cfg.sample
        self.scorer: Scorer | None = scorer_for(cfg.model.ckpt_path)
        self.embeds: dict[str, torch.Tensor] = {}
        self.vae: Any = None
        self.loaded: Any = None
        self.failed = False

    @property
    def enabled(self) -> bool:
        return self.settings is not None and not self.failed


    # ---- set-up (rank 0) -------------------------------------------------------------------------
    def encode_prompts(self) -> None:
        """Before the transformer is built: text embeddings of every prompt, then the text encoder goes."""
        if not self.enabled or not self.dist.is_main:
            return
        s = self.settings
        try:
            if self.image_mode != "none":
                self.start = self._start_image()
            encoders = self.family.load_encoders(self.model_dir, self.dist.device, self.encoder_dtype)
            for text in dict.fromkeys([*s.prompts, s.negative_prompt]):
                # On the device, like the inference worker's: the transformer moves its time
                # embedding to wherever the text embedding is.
                embed = self.family.pad_text(self.family.encode_text(encoders, [text]))
                self.embeds[text] = embed.to(self.dist.device, self.encoder_dtype)
            self.vae = encoders.vae
            if encoders.image_encoder is not None and self.image_mode != "none":
                self.image_encoder = (encoders.image_encoder.to("cpu"), encoders.image_processor)
            del encoders
            _free_memory(self.dist.device)
        except Exception as exc:  # noqa: BLE001 - sampling is optional: warn and train on
            self._give_up("preparing", exc)

    def attach(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module | None = None,
               boundary_ratio: float | None = None) -> None:
        """The transformer(s) being trained; two experts (Wan2.2 A14B) sample as inference does, each
        denoising its side of the boundary with its own LoRA."""
        if not self.enabled or not self.dist.is_main:
            return
        from engine.inference.pipeline import LoadedModel

        try:
            pipe = self.family.sampling_pipeline(self.model_dir, transformer, self.vae, transformer_2=transformer_2,
                                                 boundary_ratio=boundary_ratio, image_mode=self.image_mode,
                                                 image_encoder=self.image_encoder)
            self.loaded = LoadedModel(path=str(self.model_dir), pipe=pipe, scheduler_config=dict(pipe.scheduler.config),
                                      num_blocks=self.family.describe(self.model_dir).num_blocks,
                                      image_mode=self.image_mode, image_pipe=pipe)
        except Exception as exc:  # noqa: BLE001
            self._give_up("preparing", exc)

    # ---- when --------------------------------------------------------------------------------------
    def due(self, step: int, epoch: int, at_epoch_end: bool) -> bool:
        """Does the save just made at `step` get samples? Every save, unless a schedule narrows it. Read
        from the settings only, the same on every rank (a failure is known to rank 0 alone): it decides
        who waits at the barrier."""
        s = self.settings
        if s is None:
            return False
        if s.every_n_epochs is None and s.every_n_steps is None:
            return True
        by_steps = s.every_n_steps is not None and step % s.every_n_steps == 0
        by_epochs = s.every_n_epochs is not None and at_epoch_end and epoch % s.every_n_epochs == 0
        return by_steps or by_epochs

    # ---- drawing -------------------------------------------------------------------------------------
    def run(self, engine: Any, label: str, step: int, epoch: int) -> None:
        """Every rank calls this; rank 0 draws, the others wait."""
        if self.dist.is_main and self.enabled and self.loaded is not None:
            engine.eval()
            try:
                self._draw(label, step, epoch)
            except Exception as exc:  # noqa: BLE001
                self._warn(label, exc)
            finally:
                engine.train()
        barrier(self.dist)

    def _draw(self, label: str, step: int, epoch: int) -> None:
        from engine.inference.export import to_uint8, write_mp4, write_poster
        from engine.inference.pipeline import generate

        s = self.settings
        width, height, frames = self._size()
        folder = self.files.sample_dir(label)
        folder.mkdir(parents=True, exist_ok=True)
        negative = self.embeds[s.negative_prompt] if s.guidance_scale > 1.0 else None
        started = time.monotonic()
        videos = []
        for k, (prompt, seed) in enumerate((p, seed) for p in s.prompts for seed in s.seeds):
            made = generate(self.loaded, prompt_embeds=self.embeds[prompt], negative_embeds=negative, width=width,
                            height=height, num_frames=frames, steps=s.steps, guidance_scale=s.guidance_scale,
                            flow_shift=self._flow_shift(), seed=seed, device=self.dist.device, **self.start)
            pixels = to_uint8(made.frames)
            video = write_mp4(pixels, folder / f"{k}.mp4", s.fps)
            write_poster(pixels[len(pixels) // 2], folder / f"{k}.png")
            scores = self.scorer.score(pixels, prompt) if self.scorer else {}
            videos.append({"prompt": prompt, "seed": seed, "file": str(video), "scores": scores})
        seconds = round(time.monotonic() - started, 2)
        scores = mean_scores([v["scores"] for v in videos]) if self.scorer else {}
        self.events.emit("sample", label=label, step=step, epoch=epoch, seconds=seconds, videos=videos,
                         scores=scores, scorer=self.scorer.name if self.scorer else None)
        log.info("samples at %s: %d videos in %.1f s %s", label, len(videos), seconds, scores)

    def _start_image(self) -> dict[str, Any]:
        """The first frame of the first training clip as a PIL image."""
        from PIL import Image

        from engine.dataset import MediaItem, probe_media
        from engine.trainer.data import load_pixels

        sample = self.start_from
        width, height, frames, is_video = probe_media(sample.source)
        item = MediaItem(sample.source, sample.source.name, [""], None, width, height, frames, is_video, 1)
        first = load_pixels(item, sample.bucket, self.cfg.dataset.video_clip_mode)[:, 0]
        return {"image": Image.fromarray(((first.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())}

    def _size(self) -> tuple[int, int, int]:
        s, d = self.settings, self.cfg.dataset
        first = d.resolutions[0] if d.resolutions else 256
        side = first if isinstance(first, int) else int((first[0] * first[1]) ** 0.5) // 16 * 16
        width = s.width or side
        return width, s.height or width, s.num_frames or max(d.frame_buckets or [1])

    def _flow_shift(self) -> float:
        if self.settings.flow_shift is not None:
            return self.settings.flow_shift
        return float(self.loaded.scheduler_config.get("flow_shift") or self.loaded.scheduler_config.get("shift") or 1.0)

    # ---- failures ------------------------------------------------------------------------------------
    def _warn(self, when: str, exc: Exception) -> None:
        message = f"sampling at {when} failed: {type(exc).__name__}: {error_reason(exc)}"
        log.warning("%s", message, exc_info=True)
        self.events.emit("warning", message=message)

    def _give_up(self, when: str, exc: Exception) -> None:
        self._warn(when, exc)
        self.failed = True  # training goes on without samples


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
