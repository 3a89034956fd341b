"""Eval loss on the `[[eval_datasets]]` (diffusion-pipe's eval keys): the flow-matching loss without
gradients, with noise and timesteps fixed per eval sample, so successive evals differ only by the
LoRA. Written as `eval {step, epoch, name, loss, samples}` events next to the training loss."""

from __future__ import annotations

import torch

from engine.config import TrainConfig
from engine.families import ModelFamily
from engine.trainer import cache as cache_mod
from engine.trainer.distributed import DistInfo, mean_over_ranks
from engine.trainer.objective import sample_timesteps
from engine.trainer.order import Sample, epoch_microbatches
from engine.trainer.runfiles import MetricsWriter

_EVAL_SEED_OFFSET = 982_451_653  # eval noise never repeats a training micro-batch's noise


class Evaluator:
    def __init__(self, cfg: TrainConfig, sets: list[tuple[str, list[Sample]]], family: ModelFamily,
                 dist: DistInfo, events: MetricsWriter, image_mode: str = "none") -> None:
        self.cfg, self.sets, self.family, self.dist, self.events = cfg, sets, family, dist, events
        self.image_mode = image_mode

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """After this optimizer step? Every N steps, every N epochs, or (neither set) every epoch."""
        if not self.sets:
            return False
        every_steps, every_epochs = self.cfg.eval_every_n_steps, self.cfg.eval_every_n_epochs
        if every_steps and step % every_steps == 0:
            return True
        if step % steps_per_epoch:
            return False
        epochs = every_epochs or (1 if not every_steps else None)
        return bool(epochs) and (step // steps_per_epoch) % epochs == 0

    @torch.no_grad()
    def run(self, engine, step: int, epoch: int) -> None:  # noqa: ANN001 - a DeepSpeed engine
        engine.eval()
        try:
            for name, samples in self.sets:
                loss, count = self._loss(engine, samples)
                if self.dist.is_main:
                    self.events.emit("eval", step=step, epoch=epoch, name=name, loss=loss, samples=count)
        finally:
            engine.train()

    def _loss(self, engine, samples: list[Sample]) -> tuple[float, int]:  # noqa: ANN001
        """Mean loss over every eval sample (all ranks), each micro-batch on one rank."""
        dist = self.dist
        batches = epoch_microbatches(samples, self.cfg.eval_micro_batch_size, self.cfg.seed, 0)
        total, count = 0.0, 0
        for index in range(dist.rank, len(batches), dist.world_size):
            indices = batches[index]
            latents, text, condition = cache_mod.load_batch(self.family, samples, indices, self.image_mode)
            generator = torch.Generator().manual_seed(self.cfg.seed + _EVAL_SEED_OFFSET + index)
            noise = torch.randn(latents.shape, generator=generator)
            t = sample_timesteps(self.cfg, latents.shape[0], generator)
            device = dist.device
            loss = engine(latents.to(device), text.to(device), noise.to(device), t.to(device),
                          cache_mod.to_device(condition, device))
            total += float(loss) * len(indices)
            count += len(indices)
        # Sums over ranks: mean_over_ranks divides by the world size, so multiply it back.
        total_all = mean_over_ranks(total, dist) * dist.world_size
        count_all = round(mean_over_ranks(float(count), dist) * dist.world_size)
        return total_all / max(1, count_all), count_all

