"""The training objective: flow matching on the straight path from data (t=0) to noise (t=1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from engine.families import ModelFamily


class FlowMatchingModule(torch.nn.Module):
    """Wraps the transformer so DeepSpeed's engine forward returns the flow-matching loss."""

    def __init__(self, transformer: torch.nn.Module, family: ModelFamily, compute_dtype: torch.dtype):
        super().__init__()
        self.transformer = transformer
        self.family = family
        self.compute_dtype = compute_dtype

    def forward(self, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        t_b = t.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - t_b) * latents + t_b * noise  # x_t on the straight path from data (t=0) to noise (t=1)
        pred = self.family.forward(self.transformer, noisy.to(self.compute_dtype), t,
                                   text.to(self.compute_dtype))
        return F.mse_loss(pred.float(), (noise - latents).float())


def sample_timesteps(cfg: TrainConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    m = cfg.model
    if m.timestep_sample_method == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator))
    else:
        t = torch.rand(batch, generator=generator)
    if m.shift != 1.0:
        t = m.shift * t / (1.0 + (m.shift - 1.0) * t)
    return m.min_t + (m.max_t - m.min_t) * t
