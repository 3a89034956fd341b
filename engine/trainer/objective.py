"""The training objective: flow matching on the straight path from data (t=0) to noise (t=1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from engine.families import ModelFamily


def flow_matching_loss(family: ModelFamily, transformer: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor,
                       noise: torch.Tensor, t: torch.Tensor, compute_dtype: torch.dtype,
                       condition: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean squared error of the predicted velocity (noise - data) at noise levels t. Latent frames an
    image-to-video condition gives clean (TI2V's first frame) are not predicted, so not in the loss."""
    t_b = t.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - t_b) * latents + t_b * noise  # x_t on the straight path from data (t=0) to noise (t=1)
    pred = family.forward(transformer, noisy.to(compute_dtype), t, text.to(compute_dtype), condition)
    given = family.given_frames(condition)
    return F.mse_loss(pred[:, :, given:].float(), (noise - latents)[:, :, given:].float())


class FlowMatchingModule(torch.nn.Module):
    """Wraps the transformer so DeepSpeed's engine forward returns the flow-matching loss."""

    def __init__(self, transformer: torch.nn.Module, family: ModelFamily, compute_dtype: torch.dtype):
        super().__init__()
        self.transformer = transformer
        self.family = family
        self.compute_dtype = compute_dtype

    def forward(self, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, condition: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return flow_matching_loss(self.family, self.transformer, latents, text, noise, t, self.compute_dtype,
                                  condition)


def sample_timesteps(cfg: TrainConfig, batch: int, generator: torch.Generator,
                     t_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Noise levels drawn from the configured distribution; with `t_range` = (lo, hi), from the same
    distribution restricted to lo <= t < hi (exactly, by drawing its quantiles in that interval)."""
    m = cfg.model
    if t_range is not None:
        lo, hi = timestep_cdf(cfg, t_range[0]), timestep_cdf(cfg, t_range[1])
        q = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        return _timestep_quantile(cfg, q).float()
    if m.timestep_sample_method == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator))
    else:
        t = torch.rand(batch, generator=generator)
    if m.shift != 1.0:
        t = m.shift * t / (1.0 + (m.shift - 1.0) * t)
    return m.min_t + (m.max_t - m.min_t) * t


def timestep_cdf(cfg: TrainConfig, t: float) -> float:
    """P(sampled noise level < t) under the configured distribution (min_t/max_t, shift, method)."""
    m = cfg.model
    s = min(1.0, max(0.0, (t - m.min_t) / (m.max_t - m.min_t)))
    u = s / (m.shift - (m.shift - 1.0) * s)  # undo the flow shift t' = k t / (1 + (k-1) t)
    if m.timestep_sample_method != "logit_normal":
        return u
    if u <= 0.0 or u >= 1.0:
        return u
    return float(torch.special.ndtr(torch.logit(torch.tensor(u, dtype=torch.float64))))


def _timestep_quantile(cfg: TrainConfig, q: torch.Tensor) -> torch.Tensor:
    m = cfg.model
    u = torch.sigmoid(torch.special.ndtri(q)) if m.timestep_sample_method == "logit_normal" else q
    u = m.shift * u / (1.0 + (m.shift - 1.0) * u)
    return m.min_t + (m.max_t - m.min_t) * u
