"""Warm WanPipelines and LoRA stacks, used inside the inference worker process.

`PipelineCache` keeps one diffusers `WanPipeline` (image-to-video models: `WanImageToVideoPipeline`) per
base model (loaded once, freed after an idle timeout). LoRAs are loaded once per file (keyed by path, size and mtime) as named diffusers adapters
and mixed per request with `set_adapters(names, weights)`; with `fuse=True` the mix is merged into
the base weights (faster steps) and unmerged when the next request needs another mix.
`generate()` runs text encoding, denoising and VAE decoding as separate timed phases; a start image goes
to diffusers' WanImageToVideoPipeline (Wan I2V models; TI2V-5B through `from_pipe` of its WanPipeline).
Speed options (`InferenceSpeed`, engine/inference/speed.py) are applied when a model loads.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.inference.speed import InferenceSpeed, set_step_cache
from engine.lora import LoraError, load_lora_state_dict, validate_lora

log = logging.getLogger(__name__)

__all__ = ["PipelineCache", "LoadedModel", "LoraLoadError", "Cancelled", "generate", "MAX_SEQUENCE_LENGTH"]

MAX_SEQUENCE_LENGTH = 512  # Wan's text length (WanPipeline default)
_DIFFUSERS_NAMED = (".attn1.", ".attn2.", ".ffn.net.", ".condition_embedder.", ".proj_out.")


class LoraLoadError(ValueError):
    """A LoRA that cannot be applied to this model; the message names the file and the reason."""


class Cancelled(Exception):
    """Raised from the step callback when the request was cancelled."""


@dataclass
class LoadedModel:
    path: str
    pipe: Any  # diffusers.WanPipeline
    scheduler_config: dict
    num_blocks: int
    adapters: "OrderedDict[str, str]" = field(default_factory=OrderedDict)  # file key -> adapter name (LRU)
    fused: tuple | None = None  # (names, weights) currently merged into the base weights
    last_used: float = field(default_factory=time.monotonic)
    image_mode: str = "none"  # the model's start-image conditioning (WanModelInfo.image_mode)
    image_pipe: Any = None  # TI2V-5B: a WanImageToVideoPipeline over the same modules, made on first use

    def pipe_for(self, image: Any) -> Any:
        """The pipeline that serves a request with (or without) a start image; refuses a mismatch."""
        if image is None:
            if self.image_mode == "concat":
                raise ValueError(f"{self.path} is an image-to-video model: give a start image")
            return self.pipe
        if self.image_mode == "none":
            raise ValueError(f"{self.path} is a text-to-video model: it takes no start image")
        if self.image_mode == "concat":
            return self.pipe
        if self.image_pipe is None:
            from diffusers import WanImageToVideoPipeline

            self.image_pipe = WanImageToVideoPipeline.from_pipe(self.pipe)
            self.image_pipe.set_progress_bar_config(disable=True)
        return self.image_pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PipelineCache:
    """Base models kept warm on one device; at most `max_models` at a time (least recently used goes)."""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_models: int = 1, max_loras: int = 16, speed: InferenceSpeed = InferenceSpeed()) -> None:
        self.device = torch.device(device)
        self.speed = speed
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_models = max_models
        self.max_loras = max_loras
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()

    # ---- base models ---------------------------------------------------------------------------
    def get(self, model_path: str | Path) -> tuple[LoadedModel, float]:
        """The warm pipeline of a model and the seconds spent loading it (0.0 when it was warm)."""
        key = str(Path(model_path).resolve())
        if key in self.models:
            loaded = self.models[key]
            self.models.move_to_end(key)
            loaded.last_used = time.monotonic()
            return loaded, 0.0
        while len(self.models) >= self.max_models:
            self._free(next(iter(self.models)))
        started = time.perf_counter()
        loaded = self._load(key)
        _sync(self.device)
        self.models[key] = loaded
        return loaded, time.perf_counter() - started

    def _load(self, path: str) -> LoadedModel:
        import diffusers
        from diffusers import AutoencoderKLWan

        from engine.families.wan import WanFamily, pipeline_class_name

        log.info("loading %s on %s (%s)", path, self.device, self.dtype)
        info = WanFamily().describe(Path(path))
        # The Wan VAE is kept in float32 (as Wan's own examples do): bf16 decoding bands colours.
        parts: dict[str, Any] = {"vae": AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)}
        if info.image_encoder:  # Wan2.1 I2V's CLIP vision encoder, float32 as in Wan's examples
            from transformers import CLIPVisionModel

            parts["image_encoder"] = CLIPVisionModel.from_pretrained(path, subfolder="image_encoder",
                                                                     dtype=torch.float32)
        pipe = getattr(diffusers, pipeline_class_name(Path(path))).from_pretrained(path, **parts, dtype=self.dtype)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._apply_speed(pipe)
        num_blocks = int(pipe.transformer.config.num_layers)
        return LoadedModel(path=path, pipe=pipe, scheduler_config=dict(pipe.scheduler.config), num_blocks=num_blocks,
                           image_mode=info.image_mode)

    def _apply_speed(self, pipe: Any) -> None:
        """Speed options on every transformer of the pipeline (Wan2.2 A14B: both experts)."""
        for transformer in (pipe.transformer, getattr(pipe, "transformer_2", None)):
            if transformer is not None:
                self._speed_up(transformer)

    def _speed_up(self, transformer: Any) -> None:
        if self.speed.attention == "flash3":
            from engine.families import flash3

            reason = flash3.use_if_available(transformer)
            if reason is not None:
                log.warning("attention flash3: %s; using PyTorch's SDPA", reason)
        set_step_cache(transformer, self.speed.step_cache)
        if self.speed.compile_blocks:
            if self.device.type == "cuda":
                transformer.compile_repeated_blocks(fullgraph=False)
            else:  # Inductor on CPU needs a C++ toolchain and gains little for small models
                log.warning("compile_blocks is CUDA-only; running %s uncompiled", self.device)

    def free_idle(self, idle_s: float) -> list[str]:
        """Free models unused for `idle_s` seconds; returns their paths."""
        now = time.monotonic()
        stale = [key for key, m in self.models.items() if now - m.last_used >= idle_s]
        for key in stale:
            self._free(key)
        return stale

    def free_all(self) -> None:
        for key in list(self.models):
            self._free(key)

    def _free(self, key: str) -> None:
        log.info("freeing %s", key)
        self.models.pop(key, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- LoRA stacks ---------------------------------------------------------------------------
    def apply_loras(self, loaded: LoadedModel, loras: list[tuple[str, float]], fuse: bool = False) -> float:
        """Make exactly `loras` (resolved file, weight) active on the model; returns seconds spent."""
        started = time.perf_counter()
        pipe = loaded.pipe
        names = [self._adapter_for(loaded, path) for path, _ in loras] if loras else []
        weights = [float(w) for _, w in loras]
        wanted = (tuple(names), tuple(weights))
        if loaded.fused is not None and (not fuse or loaded.fused != wanted):
            pipe.unfuse_lora()
            loaded.fused = None
        if not names:
            if loaded.adapters:
                pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(names, weights)
            if fuse and loaded.fused != wanted:
                pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
                loaded.fused = wanted
        self._evict_loras(loaded, keep=set(names))
        _sync(self.device)
        return time.perf_counter() - started

    def _adapter_for(self, loaded: LoadedModel, path: str) -> str:
        file = Path(path)
        try:
            stat = file.stat()
        except OSError as exc:
            raise LoraLoadError(f"{file}: cannot read LoRA file ({exc.strerror})") from None
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key in loaded.adapters:
            loaded.adapters.move_to_end(key)
            return loaded.adapters[key]
        name = "lora_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        if loaded.fused is not None:  # loading into merged weights would double-count the merge
            loaded.pipe.unfuse_lora()
            loaded.fused = None
        self._load_adapter(loaded, file, name)
        loaded.adapters[key] = name
        return name

    def _load_adapter(self, loaded: LoadedModel, file: Path, name: str) -> None:
        try:
            validate_lora(file, family="wan", num_blocks=loaded.num_blocks)
            state = _diffusers_keys(load_lora_state_dict(file))
        except LoraError as exc:
            raise LoraLoadError(str(exc)) from None
        try:
            loaded.pipe.load_lora_weights(state, adapter_name=name)
            if getattr(loaded.pipe, "transformer_2", None) is not None:
                self._load_low_noise_adapter(loaded, file, name)
        except LoraError as exc:
            self._drop_adapter(loaded, name)
            raise LoraLoadError(str(exc)) from None
        except Exception as exc:  # diffusers/peft raise ValueError, KeyError, RuntimeError (shape)
            self._drop_adapter(loaded, name)
            reason = str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__
            raise LoraLoadError(f"{file}: does not fit this model ({type(exc).__name__}: {reason})") from None
        log.info("loaded LoRA %s as %s", file, name)

    def _load_low_noise_adapter(self, loaded: LoadedModel, file: Path, name: str) -> None:
        """Wan2.2 A14B: the low-noise expert (transformer_2) takes the pair's low-noise file, or the same
        file when there is no pair (a Wan2.1 LoRA applies to both, as ComfyUI users load it)."""
        from engine.lora import expert_partner

        partner = expert_partner(file) or file
        if partner != file:
            validate_lora(partner, family="wan", num_blocks=loaded.num_blocks)
        state = _diffusers_keys(load_lora_state_dict(partner))
        loaded.pipe.load_lora_weights(state, adapter_name=name, load_into_transformer_2=True)
        log.info("loaded LoRA %s into the low-noise expert as %s", partner, name)

    def _drop_adapter(self, loaded: LoadedModel, name: str) -> None:
        try:
            if name in loaded.pipe.get_list_adapters().get("transformer", []):
                loaded.pipe.delete_adapters(name)
        except Exception:  # a half-loaded adapter; nothing more to clean
            log.warning("could not remove partially loaded adapter %s", name, exc_info=True)

    def _evict_loras(self, loaded: LoadedModel, keep: set[str]) -> None:
        while len(loaded.adapters) > self.max_loras:
            victim = next((k for k, n in loaded.adapters.items() if n not in keep), None)
            if victim is None:
                return
            loaded.pipe.delete_adapters(loaded.adapters.pop(victim))


def _diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI-prefixed keys that use diffusers module names (`diffusion_model.blocks.0.attn1.to_q...`)
    become diffusers' own `transformer.` keys; original-Wan and kohya names are left to diffusers."""
    prefix = "diffusion_model."
    if all(k.startswith(prefix) for k in state) and any(
        marker in k for k in state for marker in _DIFFUSERS_NAMED
    ):
        return {"transformer." + k[len(prefix):]: v for k, v in state.items()}
    return state


# ---- one generation ------------------------------------------------------------------------------


@dataclass
class Generation:
    frames: np.ndarray  # float32 (F, H, W, 3) in [0, 1]
    seed: int
    denoise_s: float
    decode_s: float


StepCallback = Callable[[int, int, float], None]  # (step, total, seconds since denoising began)


def encode_text(loaded: LoadedModel, prompt: str, negative_prompt: str, guidance_scale: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    started = time.perf_counter()
    with torch.inference_mode():
        positive, negative = loaded.pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
            num_videos_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH, device=device,
        )
    _sync(device)
    return positive, negative, time.perf_counter() - started


def generate(loaded: LoadedModel, *, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
             width: int, height: int, num_frames: int, steps: int, guidance_scale: float, flow_shift: float,
             seed: int, device: torch.device, on_step: StepCallback | None = None,
             should_stop: Callable[[], bool] | None = None, image: Any = None) -> Generation:
    """Denoise one video from its seed (and start image, a PIL image, for image-to-video), then decode it.
    Raises Cancelled when `should_stop()` turns true."""
    pipe = loaded.pipe_for(image)
    pipe.scheduler = type(pipe.scheduler).from_config(loaded.scheduler_config, flow_shift=float(flow_shift))
    for transformer in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if getattr(transformer, "is_cache_enabled", False):
            # The pipeline resets step-cache state only when a call completes; a cancelled one leaves it set.
            transformer._reset_stateful_cache()
    generator = torch.Generator("cpu").manual_seed(int(seed))  # CPU noise: same seed, same video on any device
    started = time.perf_counter()

    def step_end(pipeline: Any, index: int, timestep: Any, tensors: dict) -> dict:
        if should_stop is not None and should_stop():
            pipeline._interrupt = True
            raise Cancelled()
        if on_step is not None:
            _sync(device)
            on_step(index + 1, steps, time.perf_counter() - started)
        return tensors

    if should_stop is not None and should_stop():
        raise Cancelled()
    with torch.inference_mode():
        latents = pipe(
            **({"image": image} if image is not None else {}),
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
            num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
            output_type="latent", return_dict=False, callback_on_step_end=step_end,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )[0]
        _sync(device)
        denoise_s = time.perf_counter() - started
        started = time.perf_counter()
        frames = decode_latents(pipe, latents)
        decode_s = time.perf_counter() - started
    return Generation(frames=frames, seed=int(seed), denoise_s=denoise_s, decode_s=decode_s)


def decode_latents(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """The VAE half of WanPipeline.__call__ (same normalisation), returning float frames (F, H, W, 3)."""
    vae = pipe.vae
    latents = latents.to(vae.device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    _sync(latents.device)
    return np.asarray(frames, dtype=np.float32)
