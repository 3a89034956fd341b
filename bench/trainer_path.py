"""The studio trainer's own code path for bench/train_step.py: `Trainer.build_model` (LoRA
injection, adapter dtype, checkpointing), the performance options, `Trainer.build_engine` (torch
AdamW inside a DeepSpeed engine) and `Trainer._micro_step` (cached latents read from disk, noise,
engine forward/backward/step), in this process.

Only two things are the bench's own: the transformer is a random-weight model of real shape built
on the GPU (instead of read from a model folder), and the one training sample is written into a
cache folder of the trainer's format.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from bench.gpu_common import real_shape_transformer

LORA_RANK = 32


def _config(case: Any, run_dir: Path):
    from engine.config import TrainConfig

    data: dict[str, Any] = {
        "output_dir": str(run_dir),
        "activation_checkpointing": case.ckpt != "off",
        "adapter": {"rank": LORA_RANK, "dtype": "bfloat16" if case.lora_dtype == "bf16" else "float32"},
        "optimizer": {"lr": 1e-4},
        "dataset": {"directory": [{"path": str(run_dir)}]},
    }
    cfg = TrainConfig.from_dict(data)
    if _has_performance_section(cfg):
        perf = case.perf
        cfg = TrainConfig.from_dict({**data, "performance": {
            "attention_backend": perf.attention_backend, "compile_blocks": perf.compile_blocks,
            "checkpointing": perf.checkpointing, "lora_compute_dtype": perf.lora_compute_dtype}})
    return cfg


def _has_performance_section(cfg: Any) -> bool:
    return hasattr(cfg, "performance")


def _write_sample(batch: Any, folder: Path, dtype: torch.dtype):
    from engine.trainer.order import Sample

    latent_path = folder / "latents.safetensors"
    text_path = folder / "text.safetensors"
    save_file({"latents": batch.latents[0].to(dtype).cpu().contiguous()}, str(latent_path))
    save_file({"text": batch.text[0].float().cpu().contiguous()}, str(text_path))
    return Sample(latent_path, text_path, None, 1, latent_path)  # type: ignore[arg-type]


def build_step(case: Any, preset: str, batch: Any) -> tuple[Callable[[], Any], dict[str, Any]]:
    from engine.families.wan_perf import apply
    from engine.trainer.distributed import init_distributed
    from engine.trainer.loop import Trainer
    from engine.trainer.runfiles import MetricsWriter

    run_dir = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    cfg = _config(case, run_dir)
    dist = init_distributed()
    trainer = Trainer(cfg, run_dir, dist, MetricsWriter(None), resume=False)
    trainer.family.load_transformer = lambda *args, **kwargs: real_shape_transformer(  # type: ignore[method-assign]
        preset, device=str(dist.device), dtype=trainer.model_dtype)
    module, params = trainer.build_model(run_dir)
    if _has_performance_section(cfg):
        applied = {"via": "trainer config [performance]", **vars(cfg.performance)}
    else:  # the trainer does not call wan_perf yet: apply the options the way it will
        applied = apply(trainer.transformer, case.perf, activation_checkpointing=cfg.activation_checkpointing).__dict__
    engine, _ = trainer.build_engine(module, params, total_steps=10_000)
    samples = [_write_sample(batch, run_dir, trainer.model_dtype)]
    state = {"step": 0}

    def step() -> float:
        loss, _ = trainer._micro_step(engine, samples, [0], state["step"], 0)
        state["step"] += 1
        return loss

    info = {"applied": applied, "lora_params": sum(p.numel() for p in params),
            "engine": type(engine).__name__}
    return step, info
