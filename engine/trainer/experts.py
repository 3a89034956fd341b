"""Wan2.2 A14B's two experts trained in one run.

The model holds a high-noise expert (`transformer`, noise levels t >= boundary) and a low-noise one
(`transformer_2`, t < boundary). Each gets its own LoRA. One optimizer step trains one expert: the
expert is drawn per step with the probability mass the timestep distribution puts on its side of
the boundary, and every micro-batch of that step (on every rank) draws t from the distribution
restricted to that side. Over many steps the noise levels are drawn exactly as a single model's
would be, while each step's gradients (and the all-reduce over ranks) touch one LoRA only; the
other expert's LoRA gets no gradient and no optimizer update (its momentum does not move it).

Memory: only the expert being run needs to sit on the GPU. With `model.idle_expert = "offload"`
(the default) the frozen weights of the idle expert live in pinned host memory and are copied in
when that expert's turn comes (a forward pre-hook, so sampling during training switches too); its
LoRA weights and optimizer state stay on the GPU. `"resident"` keeps both on the GPU (no copies;
needs room for two transformers).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.config import TrainConfig
from engine.families import ModelFamily
from engine.trainer.objective import flow_matching_loss, timestep_cdf

log = logging.getLogger(__name__)

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"
EXPERTS = (HIGH_NOISE, LOW_NOISE)  # in the order of the model folder's transformer, transformer_2


@dataclass(frozen=True)
class ExpertSchedule:
    """Which expert an optimizer step trains, and the noise levels it may draw."""

    boundary: float
    min_t: float
    max_t: float
    p_high: float  # probability mass of t >= boundary under the configured distribution
    seed: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, boundary: float) -> "ExpertSchedule":
        p_high = 1.0 - timestep_cdf(cfg, boundary)
        return cls(boundary=boundary, min_t=cfg.model.min_t, max_t=cfg.model.max_t, p_high=p_high, seed=cfg.seed)

    def expert_for_step(self, step: int) -> str:
        """The same answer on every rank and on a resume: a function of (seed, step) only."""
        generator = torch.Generator().manual_seed((self.seed * 7_919 + step * 104_729 + 17) % (2**63))
        return HIGH_NOISE if torch.rand((), generator=generator).item() < self.p_high else LOW_NOISE

    def t_range(self, expert: str) -> tuple[float, float]:
        return (self.boundary, self.max_t) if expert == HIGH_NOISE else (self.min_t, self.boundary)

    def clamp(self, t: torch.Tensor, expert: str) -> torch.Tensor:
        """Keep a low-noise draw strictly below the boundary after rounding to float32."""
        if expert == HIGH_NOISE:
            return t.clamp_min(self.boundary)
        below = torch.nextafter(torch.tensor(self.boundary, dtype=t.dtype), torch.tensor(0.0, dtype=t.dtype))
        return torch.minimum(t, below)


class ExpertPlacement:
    """Keeps the frozen weights of the expert not being run off the GPU (idle_expert = "offload")."""

    def __init__(self, experts: dict[str, torch.nn.Module], device: torch.device, offload: bool):
        self.experts = experts
        self.device = device
        self.offload = offload and device.type == "cuda"
        self.host_copies: dict[str, list[tuple[torch.nn.Parameter | torch.Tensor, torch.Tensor]]] = {}
        self.on_device: str | None = None
        for name, expert in experts.items():
            expert.register_forward_pre_hook(lambda module, args, name=name: self.bring(name))

    def bring(self, name: str) -> None:
        """Put expert `name` on the device and the other's frozen weights in host memory."""
        if not self.offload or self.on_device == name:
            return
        started = time.perf_counter()
        for other in self.experts:
            if other != name:
                self._to_host(other)
        for tensor, host in self.host_copies.get(name, []):
            tensor.data = host.to(self.device, non_blocking=True)
        self.on_device = name
        torch.cuda.synchronize(self.device)  # the copy's real time (the next forward would wait for it anyway)
        log.info("expert switch: %s on the GPU in %.2f s", name, time.perf_counter() - started)

    def _to_host(self, name: str) -> None:
        if name not in self.host_copies:  # frozen weights never change: one pinned copy serves every switch
            self.host_copies[name] = [(t, t.data.to("cpu").pin_memory()) for t in _frozen_tensors(self.experts[name])]
            log.info("expert %s: frozen weights kept in pinned host memory while idle", name)
        for tensor, host in self.host_copies[name]:
            tensor.data = host


def _frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for n, p in module.named_parameters() if not p.requires_grad and "lora_" not in n]
    return params + [b for b in module.buffers() if b is not None]


class ExpertPairModule(torch.nn.Module):
    """DeepSpeed's module for two experts: each sample goes to the expert of its noise level."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, family: ModelFamily,
                 compute_dtype: torch.dtype, boundary: float):
        super().__init__()
        self.experts = torch.nn.ModuleDict({HIGH_NOISE: high, LOW_NOISE: low})
        self.family = family
        self.compute_dtype = compute_dtype
        self.boundary = boundary
        self.ran: set[str] = set()  # experts run since the last optimizer step

    def forward(self, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, condition: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        high = t >= self.boundary
        total = latents.new_zeros((), dtype=torch.float32)
        for name, mask in ((HIGH_NOISE, high), (LOW_NOISE, ~high)):
            count = int(mask.sum())
            if count == 0:
                continue
            if torch.is_grad_enabled():  # an eval forward between steps changes no gradient
                self.ran.add(name)
            part = None if condition is None else {k: v[mask] for k, v in condition.items()}
            loss = flow_matching_loss(self.family, self.experts[name], latents[mask], text[mask], noise[mask],
                                      t[mask], self.compute_dtype, part)
            total = total + loss * (count / t.shape[0])  # equal-sized samples: the mean over the batch
        return total

    def drop_idle_gradients(self) -> None:
        """Before the optimizer step: the expert that did not run gets no gradient, hence no update
        (DeepSpeed's all-reduce fills missing gradients with zeros, and Adam would still move it)."""
        for name, expert in self.experts.items():
            if name not in self.ran:
                for param in expert.parameters():
                    param.grad = None
        self.ran.clear()
