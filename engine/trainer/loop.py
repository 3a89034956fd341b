"""The training program: data -> cache -> LoRA on the frozen transformer -> DeepSpeed loop."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch

from engine.config import TrainConfig
from engine.families import get_family
from engine.lora import save_lora
from engine.models import resolve_model
from engine.trainer import cache as cache_mod
from engine.trainer.distributed import DistInfo, any_rank, barrier, mean_over_ranks
from engine.trainer.evaluation import Evaluator
from engine.trainer.sampling import Sampler
from engine.trainer.model import build_engine, build_model
from engine.trainer.objective import sample_timesteps
from engine.trainer.order import Sample, epoch_microbatches, microbatch_for, microbatch_position, steps_per_epoch
from engine.rundir import EXPERT_LORA_FILES, LORA_FILE, ResumeError, RunDir
from engine.trainer.experts import HIGH_NOISE, LOW_NOISE, ExpertSchedule
from engine.trainer.runfiles import MetricsWriter
from engine.trainer.samples import CacheContext, StopRequested, caption_path, prepare_samples

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- the trainer ---------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, dist: DistInfo, events: MetricsWriter, resume: bool,
                 control_since: float | None = None):
        self.cfg = cfg
        self.control_since = control_since  # given by the launcher: a stop asked before our start counts
        self.run_dir = run_dir
        self.files = RunDir(run_dir)
        self.dist = dist
        self.events = events
        self.resume = resume
        self.family = get_family(cfg.model.type)
        on_gpu = dist.device.type != "cpu"
        self.model_dtype = _DTYPES[cfg.model.compute_dtype] if on_gpu else torch.float32
        self.adapter_dtype = _DTYPES[cfg.adapter.dtype] if on_gpu else torch.float32
        self.signal_stop = False
        self.stop_while_caching = False
        self.last_checkpoint_time = time.monotonic()
        self.last_saved_step = -1
        self.last_save_label = self.last_sampled_label = ""
        self.evaluator = Evaluator(cfg, [], self.family, dist, events)  # eval sets come with the samples
        self.experts: ExpertSchedule | None = None  # Wan2.2 A14B with model.experts = "both"
        self.image_mode = "none"  # image-to-video conditioning (family.image_mode), set from the model folder
        self.empty_caption: Path | None = None  # the cached empty caption, with caption dropout

    # -- setup ----------------------------------------------------------------------------------
    def prepare_samples(self, model_dir: Path) -> tuple[list[Sample], list[tuple[str, list[Sample]]]]:
        """(training samples, [(eval set name, its samples)]), all cached."""
        cfg = self.cfg
        for message in cfg.warnings:  # diffusion-pipe keys accepted with a different behaviour
            self._warn(message)
        self.image_mode = self.family.image_mode(model_dir, cfg.model.image_to_video)
        ctx = CacheContext(self.family, model_dir, cfg.resolved_cache_dir(), self.dist, self.events,
                           self.model_dtype, self._stop_requested_while_caching, self.image_mode)
        dropout = bool(cfg.caption_dropout_rate)
        samples = prepare_samples(cfg.dataset, ctx, captions=("",) if dropout else ())
        self.empty_caption = caption_path(ctx, "") if dropout else None
        evals = [(e.name, prepare_samples(e.dataset, ctx, label=f"eval dataset {e.name!r}"))
                 for e in cfg.eval_datasets or []]
        return samples, evals

    def _stop_requested_while_caching(self) -> bool:
        if self.dist.is_main and not self.stop_while_caching:
            self.stop_while_caching = self.files.take_control_request()[1]
        return self.signal_stop or self.stop_while_caching

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            self.events.emit("warning", message=message)

    def build_model(self, model_dir: Path) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """The LoRA-injected transformer(s) (engine.trainer.model); the trainer keeps what it saves."""
        built = build_model(self.cfg, self.family, model_dir, self.dist.device, self.model_dtype, self.adapter_dtype,
                            self._warn)
        self.experts, self.placement = built.experts, built.placement
        self.transformer, self.saved_transformers = built.transformer, built.saved_transformers
        self.lora_params = built.params
        return built.module, built.params

    def build_engine(self, module: torch.nn.Module, params: list[torch.nn.Parameter], total_steps: int):
        return build_engine(self.cfg, module, params, total_steps, on_cpu=self.dist.device.type == "cpu")

    # -- saving -----------------------------------------------------------------------------------
    def save_lora(self, name: str, step: int, epoch: int) -> None:
        self.last_saved_step, self.last_save_label = step, name
        if not self.dist.is_main:
            return
        from peft import get_peft_model_state_dict

        for expert, transformer in self.saved_transformers.items():
            meta = {"step": str(step), "epoch": str(epoch)}
            if expert is not None:
                meta.update(expert=expert, boundary_ratio=str(self.experts.boundary))
            path = save_lora(get_peft_model_state_dict(transformer), self.files.lora_dir(name),
                             rank=self.cfg.adapter.rank, alpha=self.cfg.lora_alpha,
                             target_modules=self.cfg.adapter.target_modules, dtype=_DTYPES[self.cfg.save_dtype],
                             base_model=self.cfg.model.ckpt_path, metadata=meta,
                             file_name=EXPERT_LORA_FILES[expert] if expert else LORA_FILE)
        self.events.emit("save", step=step, epoch=epoch, label=name, path=str(path))

    def save_checkpoint(self, engine, step: int, epoch: int, elapsed: float) -> None:
        tag = f"global_step{step}"
        engine.save_checkpoint(str(self.run_dir), tag=tag, client_state={"step": step, "epoch": epoch,
                                                                          "elapsed_s": elapsed},
                               exclude_frozen_parameters=True)
        barrier(self.dist)  # every rank's shard is on disk before the marker says "complete"
        if self.dist.is_main:
            self.files.mark_checkpoint_complete(tag, step, epoch)
            self.events.emit("checkpoint", step=step, path=str(self.run_dir / tag))
        self.last_checkpoint_time = time.monotonic()

    # -- control ----------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.signal_stop = True

    def poll_control(self, step: int) -> tuple[bool, bool, bool]:
        """(save_lora, checkpoint, stop) agreed by all ranks."""
        cfg = self.cfg
        save = ckpt = stop = False
        if self.dist.is_main:
            save, stop = self.files.take_control_request()
            minutes = cfg.checkpoint_every_n_minutes
            if minutes and time.monotonic() - self.last_checkpoint_time >= minutes * 60:
                ckpt = True
        save, ckpt, stop = any_rank([save, ckpt, stop or self.signal_stop], self.dist)
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
            save = True
        return save, ckpt, stop

    # -- main -------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, dist = self.cfg, self.dist
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if dist.is_main:
            self.files.discard_stale_control_files(self.control_since or _process_start_time())
        model_dir = resolve_model(cfg.model.ckpt_path)
        try:
            samples, eval_sets = self.prepare_samples(model_dir)
        except StopRequested:  # stopped while encoding the cache: nothing new to save
            found = self.files.latest_complete_checkpoint() if self.resume else None
            if dist.is_main:
                self.events.emit("stopped", step=found[1] if found else 0)
            return 0
        micro_bs, ga, world = cfg.micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, dist.world_size
        first_epoch = epoch_microbatches(samples, micro_bs, cfg.seed, 0)
        spe = steps_per_epoch(len(first_epoch), world, ga)
        total_steps = spe * cfg.epochs
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)

        self.sampler = Sampler(cfg, model_dir, self.family, dist, self.events, self.run_dir, self.model_dtype,
                               self.image_mode, start_from=samples[0])
        self.sampler.encode_prompts()  # before the transformer: the text encoder never sits beside it
        module, params = self.build_model(model_dir)
        self.sampler.attach(*self._sampling_transformers())
        engine, scheduler = self.build_engine(module, params, total_steps)
        if self.experts is not None:  # DeepSpeed put both on the device; the first step's expert stays
            self.placement.bring(self.experts.expert_for_step(0))
            if self.placement.offload:  # the steps' peak memory, not that start-up moment with both on the GPU
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dist.device)
        self.evaluator = Evaluator(cfg, eval_sets, self.family, dist, self.events, self.image_mode)

        start_step, elapsed_before = 0, 0.0
        if self.resume:
            found = self.files.latest_complete_checkpoint()
            if found is None:
                raise ResumeError(f"--resume: no complete checkpoint (global_stepN/ with complete.json) in {self.run_dir}")
            tag, _ = found
            _, client = engine.load_checkpoint(str(self.run_dir), tag=tag, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
            start_step = int(client["step"])
            elapsed_before = float(client.get("elapsed_s", 0.0))
        if dist.is_main:  # the config as read (dataset inlined, absolute paths); may replace --config itself
            self.files.write_config(cfg.to_toml())
        if dist.device.type == "cuda":  # step peaks: training's own, not the cache encoders' (what the planner plans)
            torch.cuda.reset_peak_memory_stats(dist.device)
        if dist.is_main:
            self.events.emit("start", total_steps=total_steps, epochs=cfg.epochs, world_size=world,
                             steps_per_epoch=spe, resumed_from_step=start_step, num_samples=len(samples),
                             run_dir=str(self.run_dir), **_memory_cap_fields())
        if cfg.eval_before_first_step and start_step == 0:
            self.evaluator.run(engine, 0, 0)
        if cfg.sample is not None and cfg.sample.at_start and start_step == 0:
            self.sampler.run(engine, "start", 0, 0)
        return self.train_loop(engine, scheduler, samples, spe, total_steps, start_step, elapsed_before)

    def train_loop(self, engine, scheduler, samples: list[Sample], spe: int, total_steps: int,
                   start_step: int, elapsed_before: float) -> int:
        cfg, dist = self.cfg, self.dist
        ga, world = cfg.gradient_accumulation_steps, dist.world_size
        t_start = time.monotonic()
        step_times: list[float] = []
        epoch_losses: list[float] = []
        batches: list[list[int]] = []
        batches_epoch = -1
        step = start_step
        engine.train()
        while step < total_steps:
            epoch_index = step // spe
            if epoch_index != batches_epoch:
                batches = epoch_microbatches(samples, cfg.micro_batch_size_per_gpu, cfg.seed, epoch_index)
                batches_epoch = epoch_index
                if step % spe == 0:
                    epoch_losses = []
            if dist.cpu_threads is not None:
                dist.cpu_threads.update()  # a generation may have started or ended on the CPU
            t0 = time.monotonic()
            lr = scheduler.get_last_lr()[0]
            losses = []
            grad_norm = None
            for accum in range(ga):
                indices = microbatch_for(batches, step % spe, accum, dist.rank, world, ga)
                loss, norm = self._micro_step(engine, samples, indices, step, accum)
                losses.append(loss)
                grad_norm = norm if norm is not None else grad_norm
            step += 1
            loss_value = mean_over_ranks(sum(losses) / len(losses), dist)
            epoch_losses.append(loss_value)
            step_times.append(time.monotonic() - t0)
            epoch = epoch_index + 1
            if dist.is_main:
                recent = step_times[-20:]
                mean_time = sum(recent) / len(recent)
                self.events.emit(
                    "step", step=step, total_steps=total_steps, epoch=epoch, loss=loss_value, lr=lr,
                    grad_norm=grad_norm,
                    samples_per_s=cfg.micro_batch_size_per_gpu * ga * world / max(step_times[-1], 1e-9),
                    elapsed_s=round(elapsed_before + time.monotonic() - t_start, 3),
                    eta_s=round(mean_time * (total_steps - step), 1),
                    **_memory_fields(dist.device),
                )
            elapsed = elapsed_before + time.monotonic() - t_start
            if step % spe == 0 and dist.is_main:  # end of an epoch
                self.events.emit("epoch", epoch=epoch, step=step,
                                 mean_loss=sum(epoch_losses) / max(1, len(epoch_losses)))
            if self.evaluator.due(step, spe):
                self.evaluator.run(engine, step, epoch)
            if self._save_and_checkpoint(engine, step, epoch, spe, total_steps, elapsed):
                if dist.is_main:
                    self.events.emit("stopped", step=step)
                return 0
            self._sample_new_save(engine, step, epoch, step % spe == 0)
        if self.last_saved_step != step:
            epoch = (step - 1) // spe + 1
            self.save_lora(f"epoch{epoch}" if step % spe == 0 else f"step{step}", step, epoch)
            self._sample_new_save(engine, step, epoch, step % spe == 0)
        barrier(dist)
        if dist.is_main:
            self.events.emit("done", step=step)
        return 0

    def _save_and_checkpoint(self, engine, step: int, epoch: int, spe: int, total_steps: int,
                             elapsed: float) -> bool:
        """Scheduled and requested LoRA saves and checkpoints after a step; True = stop now."""
        cfg = self.cfg
        save, ckpt, stop = self.poll_control(step)
        if step % spe == 0:
            save_epochs = cfg.effective_save_every_n_epochs
            if save_epochs and epoch % save_epochs == 0:
                self.save_lora(f"epoch{epoch}", step, epoch)
            if cfg.checkpoint_every_n_epochs and epoch % cfg.checkpoint_every_n_epochs == 0:
                ckpt = True
        if (save or stop) and self.last_saved_step != step:
            self.save_lora(f"step{step}", step, epoch)
        if (ckpt or stop) and step < total_steps:  # the final step needs no checkpoint
            self.save_checkpoint(engine, step, epoch, elapsed)
        return stop

    def _sample_new_save(self, engine, step: int, epoch: int, at_epoch_end: bool) -> None:
        """Samples for the save made at this step, if any (a save made earlier has had its turn)."""
        if self.last_saved_step == step and self.last_save_label != self.last_sampled_label:
            self.last_sampled_label = self.last_save_label
            if self.sampler.due(step, epoch, at_epoch_end):
                self.sampler.run(engine, self.last_save_label, step, epoch)

    def _micro_step(self, engine, samples: list[Sample], indices: list[int], step: int,
                    accum: int) -> tuple[float, float | None]:
        """One forward/backward (+ optimizer step at the accumulation boundary): (loss, grad norm)."""
        cfg, dist = self.cfg, self.dist
        # Noise, timesteps and dropout depend only on (seed, the micro-batch's global position): resume
        # replays them, and N GPUs draw what one GPU accumulating N micro-batches draws.
        position = microbatch_position(step, accum, dist.rank, dist.world_size, cfg.gradient_accumulation_steps)
        seed = (cfg.seed * 1_000_003 + position * 10_007) % (2**63)
        generator = torch.Generator().manual_seed(seed)
        texts = dropped_captions(samples, indices, self.empty_caption, cfg.caption_dropout_rate or 0.0, generator)
        latents, text, condition = cache_mod.load_batch(self.family, samples, indices, self.image_mode, texts)
        device = dist.device
        if device.type == "cpu":
            noise = torch.randn(latents.shape, generator=generator)
        else:  # drawn where it is used: a host draw of a 480p81 latent costs over a percent of a GPU step
            noise = torch.randn(latents.shape, generator=torch.Generator(device).manual_seed(seed), device=device)
        t = self._timesteps(step, latents.shape[0], generator)
        torch.manual_seed(seed)
        condition = cache_mod.to_device(condition, device)
        loss = engine(latents.to(device), text.to(device), noise, t.to(device), condition)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and self.experts is not None:
            engine.module.drop_idle_gradients()
        norm = None
        if boundary and cfg.zero_stage == 0:
            norm = _clip_lora_grads(self.lora_params, cfg.gradient_clipping)
        engine.step()
        if boundary and norm is None:
            reported = engine.get_global_grad_norm()
            norm = None if reported is None else torch.as_tensor(reported, dtype=torch.float32)
        loss = loss.detach().float().reshape(())
        if norm is None:
            return loss.item(), None
        # One device sync for both values, after the optimizer step is queued.
        loss_value, norm_value = torch.stack([loss, norm.to(loss.device, torch.float32).reshape(())]).tolist()
        return loss_value, norm_value


    def _timesteps(self, step: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels of a micro-batch; with two experts, from the side of the boundary of this step's expert."""
        if self.experts is None:
            return sample_timesteps(self.cfg, batch, generator)
        expert = self.experts.expert_for_step(step)
        t = sample_timesteps(self.cfg, batch, generator, self.experts.t_range(expert))
        return self.experts.clamp(t, expert)

    def _sampling_transformers(self) -> tuple:
        """(transformer, transformer_2, boundary) for samples drawn during training."""
        if self.experts is None:
            return (self.transformer,)
        return (self.saved_transformers[HIGH_NOISE], self.saved_transformers[LOW_NOISE], self.experts.boundary)


def dropped_captions(samples: list[Sample], indices: list[int], empty: Path | None, rate: float,
                     generator: torch.Generator) -> list[Path] | None:
    """The micro-batch's text paths with caption dropout (each sample's caption replaced by the empty one
    with probability `rate`), or None without it (no draw: the noise of runs without dropout is unchanged)."""
    if empty is None or rate <= 0:
        return None
    drop = (torch.rand(len(indices), generator=generator) < rate).tolist()
    return [empty if dropped else samples[i].text_path for i, dropped in zip(indices, drop)]


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _memory_cap_fields() -> dict[str, float]:
    """The start event names the cap a run was measured under, so its peak is read against it."""
    from engine.planner_estimate import memory_cap_gib

    cap = memory_cap_gib()
    return {"gpu_memory_cap_gib": cap} if cap is not None and torch.cuda.is_available() else {}


def _memory_fields(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def _clip_lora_grads(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the (already all-reduced) LoRA gradients to `max_norm` (0 = don't); returns their norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm(grads)
