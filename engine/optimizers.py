"""The optimizers `[optimizer] type` names (diffusion-pipe's names, case-insensitive), and the class
each one builds. Libraries are optional: an optimizer from a library that is not installed falls
back to torch's AdamW with a warning saying so (`choose`), unless nothing sensible can stand in.
No torch import at module level: the config check asks `choose` without loading torch.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from engine.config_types import ConfigError

__all__ = ["OptimizerChoice", "choose", "build", "KNOWN"]

_TORCH_ADAMW = ("torch", "torch.optim", "AdamW")


@dataclass(frozen=True)
class OptimizerChoice:
    module: str  # where the class lives, e.g. "bitsandbytes.optim"
    cls: str
    warning: str | None  # what differs from what the name asks for, or None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.cls}"


# name -> (library to check, module, class, what the fallback to torch AdamW loses or None if exact)
_TABLE: dict[str, tuple[tuple[str, str, str], str | None]] = {
    "adamw": (_TORCH_ADAMW, None),
    "adamw_optimi": (("optimi", "optimi", "AdamW"), "no Kahan summation for bfloat16 LoRA weights"),
    "stableadamw": (("optimi", "optimi", "StableAdamW"), "plain AdamW update"),
    "adamw8bit": (("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"), "32-bit optimizer states (more memory)"),
    "adamw8bitkahan": (("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"), "32-bit optimizer states (more memory)"),
    "sgd": (("torch", "torch.optim", "SGD"), None),
    "prodigy": (("prodigyopt", "prodigyopt", "Prodigy"), None),
    "automagic": (_TORCH_ADAMW, "AdamW at optimizer.lr (automagic is diffusion-pipe's own optimizer)"),
}
KNOWN = tuple(_TABLE)
_INSTALL = {"optimi": "torch-optimi", "bitsandbytes": "bitsandbytes", "prodigyopt": "prodigyopt"}


def _installed(library: str) -> bool:
    return importlib.util.find_spec(library) is not None


def choose(type_name: str) -> OptimizerChoice:
    """The class `type_name` builds here, with a warning when it is not exactly what was asked."""
    key = type_name.strip().lower()
    if key == "adamw8bitkahan" and _installed("bitsandbytes"):
        return OptimizerChoice("bitsandbytes.optim", "AdamW8bit", "8-bit AdamW without Kahan summation")
    if key in _TABLE:
        (library, module, cls), fallback = _TABLE[key]
        if library == "torch" or _installed(library):
            warning = fallback if (library, module, cls) == _TORCH_ADAMW and fallback else None
            return OptimizerChoice(module, cls, warning)
        if fallback is None:
            raise ConfigError("optimizer.type", f"{type_name!r} needs the {_INSTALL[library]!r} package "
                                                "(pip install it into the studio's environment)")
        return OptimizerChoice("torch.optim", "AdamW",
                               f"{_INSTALL[library]!r} is not installed: uses torch AdamW ({fallback})")
    if _installed("pytorch_optimizer"):  # diffusion-pipe loads any other name from this library
        library = importlib.import_module("pytorch_optimizer")
        if hasattr(library, type_name):
            return OptimizerChoice("pytorch_optimizer", type_name, None)
    raise ConfigError("optimizer.type", f"{type_name!r} is not a known optimizer ({', '.join(KNOWN)}; other names "
                                        "come from the pytorch-optimizer package when it is installed)")


def build(cfg: Any, params: list, *, on_cpu: bool) -> Any:
    """The optimizer for `params` from an `OptimizerConfig`. bitsandbytes' 8-bit states need CUDA:
    CPU ranks use torch AdamW (a logged warning, the same update in 32 bits)."""
    import logging

    choice = choose(cfg.type)
    if on_cpu and choice.module.startswith("bitsandbytes"):
        logging.getLogger(__name__).warning("8-bit AdamW needs CUDA: CPU ranks use torch AdamW")
        choice = OptimizerChoice(*_TORCH_ADAMW[1:], None)
    klass = getattr(importlib.import_module(choice.module), choice.cls)
    if choice.cls == "SGD":
        return klass(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return klass(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
