"""diffusion-pipe's keys, taken as written: each one the studio does not implement itself is mapped
to what it does instead, or accepted with exactly one warning saying so, before the typed config
sees the data. Keys listed nowhere here stay unknown keys (an error with a suggestion).

`translate_main` works on the main table (after its dataset files were read), `translate_dataset`
on one dataset table; both edit the dict in place and return (key path, warning) pairs.
"""
from __future__ import annotations

from typing import Any

Warnings = list[tuple[str, str]]

_NO_PIPELINE = "ignored: the studio trains data parallel (pipeline_stages = 1)"

# Keys accepted and ignored, with what the studio does instead (main table).
IGNORED_MAIN = {
    "partition_method": _NO_PIPELINE,
    "partition_split": _NO_PIPELINE,
    "steps_per_print": "ignored: every step is written to metrics.jsonl",
    "disable_block_swap_for_eval": "ignored: blocks stay swapped during eval",
    "reentrant_activation_checkpointing": "ignored: the studio uses non-reentrant checkpointing",
    "pseudo_huber_c": "ignored: the loss is the plain mean squared error",
    "x_axis_examples": "ignored: charts use the optimizer step as x axis",
    "map_num_proc": "ignored: caching encodes one file at a time on each rank",
    "save_every_n_examples": "ignored: use save_every_n_steps or save_every_n_epochs",
    "eval_every_n_examples": "ignored: use eval_every_n_steps or eval_every_n_epochs",
    "image_micro_batch_size_per_gpu": "ignored: images and videos share micro_batch_size_per_gpu",
    "image_eval_micro_batch_size_per_gpu": "ignored: images and videos share eval_micro_batch_size_per_gpu",
    "uncond_fraction": "ignored: the studio always trains with the caption",
    "monitoring": "ignored: no wandb; the studio charts loss, lr and eval loss from metrics.jsonl",
}
IGNORED_MODEL = {
    "llm_path": "ignored: the text encoder is read from ckpt_path (its text_encoder folder)",
    "vae_path": "ignored: the VAE is read from ckpt_path (its vae folder)",
    "clip_path": "ignored: Wan text-to-video uses no CLIP model",
    "flux_shift": "ignored: use shift",
}
IGNORED_ADAPTER = {
    "fuse_adapters": "ignored: no LoRA is fused into the base model before training",
}
IGNORED_OPTIMIZER = {
    "stabilize": "ignored: the studio's optimizers have no 'stabilize' option",
    "gradient_release": "ignored: gradients are released by DeepSpeed after each step",
    "beta2_half_life": "ignored: set optimizer.betas",
}
IGNORED_DATASET = {
    "cache_shuffle_num": "ignored: captions are cached once, as written",
    "cache_shuffle_delimiter": "ignored: captions are cached once, as written",
    "shuffle_tags": "ignored: captions are used as written",
    "caption_prefix": "ignored: write the prefix into the captions",
    "size_buckets": "ignored: buckets come from resolutions, ar_buckets / min_ar..max_ar and frame_buckets",
    "shuffle_metadata": "ignored: the data order depends only on the seed",
}
IGNORED_DIRECTORY = {
    **IGNORED_DATASET,
    "mask_path": "ignored: masked training is not implemented; every pixel is trained",
    "default_mask_file": "ignored: masked training is not implemented",
    "control_path": "ignored: control images are not used by Wan text-to-video",
}


def _drop(table: dict[str, Any], ignored: dict[str, str], prefix: str, warnings: Warnings) -> None:
    for key, why in ignored.items():
        if key in table:
            del table[key]
            warnings.append((f"{prefix}{key}", why))


def translate_main(data: dict[str, Any]) -> Warnings:
    """The main table; data["dataset"] and each eval dataset are tables by now."""
    warnings: Warnings = []
    _drop(data, IGNORED_MAIN, "", warnings)
    _activation_checkpointing(data)
    _micro_batch(data, warnings)
    _move_clip_mode(data)
    if "compile" in data:  # torch.compile of the model: the studio compiles each block
        performance = data.setdefault("performance", {})
        if isinstance(performance, dict):
            performance.setdefault("compile_blocks", bool(data.pop("compile")))
    if "force_constant_lr" in data:
        lr = data.pop("force_constant_lr")
        data["lr_scheduler"], data["warmup_steps"] = "constant", 0
        if isinstance(data.get("optimizer"), dict):
            data["optimizer"]["lr"] = lr
    for name, ignored in (("model", IGNORED_MODEL), ("adapter", IGNORED_ADAPTER), ("optimizer", IGNORED_OPTIMIZER)):
        if isinstance(data.get(name), dict):
            _drop(data[name], ignored, f"{name}.", warnings)
    if isinstance(data.get("model"), dict):
        _float8(data["model"], warnings)
    if isinstance(data.get("dataset"), dict):
        warnings += translate_dataset(data["dataset"], "dataset.")
    for i, entry in enumerate(data.get("eval_datasets") or []):
        if isinstance(entry, dict) and isinstance(entry.get("dataset"), dict):
            warnings += translate_dataset(entry["dataset"], f"eval_datasets[{i}].dataset.")
    return warnings


def translate_dataset(table: dict[str, Any], prefix: str) -> Warnings:
    warnings: Warnings = []
    _drop(table, IGNORED_DATASET, prefix, warnings)
    repeats = table.pop("num_repeats", None)  # a dataset-wide default for its directories
    directories = table.get("directory")
    for i, directory in enumerate(directories if isinstance(directories, list) else [directories]):
        if isinstance(directory, dict):
            _drop(directory, IGNORED_DIRECTORY, f"{prefix}directory[{i}].", warnings)
            if repeats is not None:
                directory.setdefault("num_repeats", repeats)
    return warnings


def _activation_checkpointing(data: dict[str, Any]) -> None:
    """diffusion-pipe's 'unsloth' keeps the checkpointed blocks' inputs in host memory: our 'offload' mode."""
    if data.get("activation_checkpointing") == "unsloth":
        data["activation_checkpointing"] = True
        data.setdefault("performance", {}).setdefault("checkpointing", "offload")


def _micro_batch(data: dict[str, Any], warnings: Warnings) -> None:
    """Per-resolution batch sizes ([[512, 4], [1024, 1]]): the smallest one for every bucket."""
    for key in ("micro_batch_size_per_gpu", "eval_micro_batch_size_per_gpu"):
        value = data.get(key)
        if isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 2 for v in value):
            data[key] = min(v[1] for v in value)
            warnings.append((key, f"per-resolution batch sizes are not implemented: uses {data[key]} for every bucket"))


def _move_clip_mode(data: dict[str, Any]) -> None:
    """diffusion-pipe sets video_clip_mode in the main file; the studio keeps it with the dataset."""
    if "video_clip_mode" not in data:
        return
    mode = data.pop("video_clip_mode")
    tables = [data.get("dataset")] + [e.get("dataset") for e in data.get("eval_datasets") or [] if isinstance(e, dict)]
    for table in tables:
        if isinstance(table, dict):
            table.setdefault("video_clip_mode", mode)


def _float8(model: dict[str, Any], warnings: Warnings) -> None:
    """diffusion-pipe's 'float8' (and its e4m3 / e5m2 spellings) is the studio's 'float8' (e4m3 weights)."""
    value = model.get("transformer_dtype")
    if isinstance(value, str) and value.startswith("float8") and value != "float8":
        model["transformer_dtype"] = "float8"
        if "e5m2" in value:
            warnings.append(("model.transformer_dtype", f"'{value}': weights are stored as float8 e4m3 (torchao)"))
