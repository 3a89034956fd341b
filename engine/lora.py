"""LoRA files in the format ComfyUI, diffusion-pipe and diffusers load for Wan.

Saved layout (one folder per save): `adapter_model.safetensors` with keys
`diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` where <module> is the ORIGINAL Wan
module name (`blocks.0.self_attn.q`, `blocks.0.cross_attn.o`, `blocks.0.ffn.0`), as ComfyUI and
diffusion-pipe write them (alpha folded into B, so alpha = rank)
and a PEFT `adapter_config.json`. `inspect_lora` reads any LoRA file with clear errors for
truncated/corrupt files and for LoRAs of another model family.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from engine.rundir import LORA_FILE

__all__ = [
    "LoraError",
    "LoraFormatError",
    "LoraFamilyError",
    "LoraInfo",
    "COMFY_PREFIX",
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "save_lora",
    "inspect_lora",
    "validate_lora",
    "load_lora_state_dict",
    "peft_state_from_file",
    "read_safetensors_header",
    "diffusers_to_wan_module",
    "wan_to_diffusers_module",
    "expert_partner",
]

COMFY_PREFIX = "diffusion_model."
ADAPTER_FILE = LORA_FILE  # the run directory's name for a save's weights
CONFIG_FILE = "adapter_config.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class LoraError(ValueError):
    """A LoRA file that cannot be used; the message says why and which file."""


class LoraFormatError(LoraError):
    """Not a readable safetensors LoRA (truncated, corrupt header, no LoRA keys)."""


class LoraFamilyError(LoraError):
    """A readable LoRA made for another model family."""


@dataclass
class LoraInfo:
    path: Path
    family: str  # "wan" or a guess at the other family ("flux", "sdxl", "hunyuan", "ltx", "unknown")
    key_format: str  # "comfy" | "peft" | "kohya"
    rank: int
    num_modules: int
    dtype: str
    modules: list[str] = field(default_factory=list)
    num_blocks: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


# ---- saving --------------------------------------------------------------------------------------


def save_lora(
    peft_state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    dtype: torch.dtype = torch.bfloat16,
    base_model: str | None = None,
    metadata: dict[str, str] | None = None,
    file_name: str = ADAPTER_FILE,
) -> Path:
    """Write `peft_state` (keys like `blocks.0.attn1.to_q.lora_A.weight`, from
    `peft.get_peft_model_state_dict`) as a ComfyUI-format LoRA folder. Returns the folder.

    The file is written to a temporary name and renamed, so a crash never leaves a half file.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = float(alpha) / float(rank)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, suffix = _split_suffix(_strip_peft_adapter_name(key))
        tensor = value.detach().to("cpu", torch.float32)
        if suffix == ".lora_B.weight" and scale != 1.0:
            tensor = tensor * scale  # fold alpha/rank into B: readers assume alpha = rank
        tensors[COMFY_PREFIX + diffusers_to_wan_module(module) + suffix] = tensor.to(dtype).contiguous()
    if not tensors:
        raise LoraError("no LoRA weights to save (is the adapter attached?)")
    tmp = out_dir / (file_name + ".tmp")
    meta = {"format": "pt", "family": "wan", **(metadata or {})}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out_dir / file_name)

    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(set(target_modules)),
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir


# diffusers module names -> original Wan names (what ComfyUI and diffusers' Wan LoRA loader expect).
_BLOCK_RENAMES = [
    (".attn1.to_q", ".self_attn.q"), (".attn1.to_k", ".self_attn.k"), (".attn1.to_v", ".self_attn.v"),
    (".attn1.to_out.0", ".self_attn.o"), (".attn2.to_q", ".cross_attn.q"), (".attn2.to_k", ".cross_attn.k"),
    (".attn2.to_v", ".cross_attn.v"), (".attn2.to_out.0", ".cross_attn.o"),
    (".attn2.add_k_proj", ".cross_attn.k_img"), (".attn2.add_v_proj", ".cross_attn.v_img"),
    (".ffn.net.0.proj", ".ffn.0"), (".ffn.net.2", ".ffn.2"),
]
_TOP_RENAMES = [("condition_embedder.time_proj", "time_projection.1"), ("proj_out", "head.head")]
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _split_suffix(key: str) -> tuple[str, str]:
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise LoraError(f"unexpected LoRA key {key!r}")


def diffusers_to_wan_module(name: str) -> str:
    """'blocks.3.attn1.to_q' -> 'blocks.3.self_attn.q' (unchanged if already original)."""
    for old, new in _TOP_RENAMES:
        if name == old:
            return new
    for old, new in _BLOCK_RENAMES:
        if name.endswith(old) and name.startswith("blocks."):
            return name[: -len(old)] + new
    return name


def wan_to_diffusers_module(name: str) -> str:
    for old, new in _TOP_RENAMES:
        if name == new:
            return old
    for old, new in _BLOCK_RENAMES:
        if name.endswith(new) and name.startswith("blocks."):
            return name[: -len(new)] + old
    return name


def _strip_peft_adapter_name(key: str) -> str:
    # get_peft_model_state_dict already drops ".default"; accept raw module state dicts too.
    key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    for prefix in ("base_model.model.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def expert_partner(file: str | Path) -> Path | None:
    """The low-noise LoRA saved beside a Wan2.2 high-noise one (`high_noise_model.safetensors` ->
    `low_noise_model.safetensors`, `..._HIGH_fp16.safetensors` -> `..._LOW_fp16.safetensors`), if it exists."""
    file = Path(file)
    for high, low in (("high_noise", "low_noise"), ("HIGH", "LOW"), ("High", "Low")):
        if high in file.name:
            partner = file.with_name(file.name.replace(high, low))
            if partner.is_file():
                return partner
    return None


# ---- reading -------------------------------------------------------------------------------------


def _lora_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / ADAPTER_FILE
        if candidate.is_file():
            return candidate
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise LoraFormatError(f"{path}: folder has no {ADAPTER_FILE}")
    if not path.is_file():
        raise LoraFormatError(f"{path}: LoRA file not found")
    return path


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header without loading tensors."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LoraFormatError(f"{path}: file is too small to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len == 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise LoraFormatError(f"{path}: corrupt or truncated safetensors header (not a complete LoRA file)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFormatError(f"{path}: corrupt safetensors header (invalid JSON)") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2 or offsets[1] > data_len:
            raise LoraFormatError(f"{path}: truncated file (tensor {name!r} extends past the end)")
    return header


# "blocks.N.<part>" at a name boundary (so LTX/Flux "transformer_blocks.N" does not count as Wan).
_WAN_BLOCK = re.compile(r"(?:^|[\s.]|lora_unet_)blocks[._](\d+)[._](self_attn|cross_attn|attn1|attn2|ffn|norm)")
_FAMILY_HINTS = [
    ("flux", re.compile(r"double_blocks|single_blocks|single_transformer_blocks")),
    ("hunyuan", re.compile(r"txt_in|individual_token_refiner")),
    ("ltx", re.compile(r"transformer_blocks[._]\d+[._](attn1|attn2|ff)")),
    ("sdxl", re.compile(r"down_blocks|up_blocks|input_blocks|output_blocks|lora_te")),
]


def _module_name(key: str) -> tuple[str, str] | None:
    """(module, kind) for a LoRA weight key, kind in {'A','B','alpha'}; None for other keys."""
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_down.weight", "A"),
                         (".lora_up.weight", "B"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def inspect_lora(path: str | Path) -> LoraInfo:
    """Read a LoRA's header: family, key format, rank, module count. Raises LoraFormatError."""
    file = _lora_file(path)
    header = read_safetensors_header(file)
    metadata = header.pop("__metadata__", None) or {}
    modules: dict[str, dict] = {}
    for key, info in header.items():
        parsed = _module_name(key)
        if parsed:
            modules.setdefault(parsed[0], {})[parsed[1]] = info
    down = {m: v["A"] for m, v in modules.items() if "A" in v}
    if not down:
        raise LoraFormatError(f"{file}: no LoRA weights found (expected *.lora_A.weight / *.lora_down.weight keys)")
    first_key = next(iter(header))
    key_format = ("kohya" if first_key.startswith("lora_unet_") else
                  "comfy" if first_key.startswith(COMFY_PREFIX) else "peft")
    ranks = {int(v["shape"][0]) for v in down.values()}
    names = " ".join(modules)
    wan_blocks = {int(m.group(1)) for m in _WAN_BLOCK.finditer(names)}
    family = "wan" if wan_blocks else "unknown"
    if family != "wan":
        for name, pattern in _FAMILY_HINTS:
            if pattern.search(names):
                family = name
                break
    dtype = next(iter(down.values())).get("dtype", "?")
    return LoraInfo(path=file, family=family, key_format=key_format, rank=max(ranks), num_modules=len(down),
                    dtype=str(dtype), modules=sorted(down), num_blocks=len(wan_blocks), metadata=dict(metadata))


def validate_lora(path: str | Path, family: str = "wan", num_blocks: int | None = None) -> LoraInfo:
    """inspect_lora + check it belongs to `family` (and fits a model with `num_blocks` blocks)."""
    info = inspect_lora(path)
    if info.family != family:
        other = "an unknown model" if info.family == "unknown" else f"a {info.family} model"
        raise LoraFamilyError(f"{info.path}: this LoRA was made for {other}, not {family}")
    if num_blocks is not None and info.num_blocks:
        deepest = max(int(m.group(1)) for m in _WAN_BLOCK.finditer(" ".join(info.modules)))
        if deepest >= num_blocks:
            raise LoraFamilyError(
                f"{info.path}: LoRA targets block {deepest} but the model has {num_blocks} blocks "
                "(made for a larger Wan variant?)"
            )
    return info


def load_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checked LoRA file (on CPU)."""
    from safetensors.torch import load_file

    file = _lora_file(path)
    read_safetensors_header(file)
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise LoraFormatError(f"{file}: cannot read LoRA: {exc}") from None


def peft_state_from_file(path: str | Path, *, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A ComfyUI/PEFT-format Wan LoRA as a peft state dict for a model whose LoRA uses (rank, alpha).
    The saved file has alpha folded into B; unfold it for the target scale."""
    state = load_lora_state_dict(path)
    scale = float(alpha) / float(rank)

    def local(key: str) -> str:
        return _strip_peft_adapter_name(key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key)

    # Other tools store alpha per module (`<module>.alpha`, delta = B @ A * alpha / r); ours is folded
    # into B. Fold theirs the same way, so a LoRA starts from the update it applies in ComfyUI.
    alphas = {local(key)[: -len(".alpha")]: float(value) for key, value in state.items() if key.endswith(".alpha")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("lora_unet_"):
            raise LoraFormatError(f"{path}: kohya-format LoRAs cannot initialise training; use a ComfyUI/PEFT one")
        if key.endswith(".alpha"):
            continue
        module, suffix = _split_suffix(local(key))
        if suffix == ".lora_B.weight":
            fold = alphas[module] / value.shape[1] if module in alphas else 1.0  # B is [out, r]
            if fold != 1.0 or scale != 1.0:
                value = value.float() * fold / scale
        out[wan_to_diffusers_module(module) + suffix] = value
    return out
