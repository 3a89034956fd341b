"""Where models live: the embedded demo model or a local diffusers folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ModelNotFoundError", "resolve_model", "demo_model_dir", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent


class ModelNotFoundError(FileNotFoundError):
    """The named model is not a usable local diffusers folder."""


def demo_model_dir() -> Path:
    return REPO_ROOT / "assets" / "demo_model"


def resolve_model(name_or_path: str) -> Path:
    """'demo' -> the committed demo model; else a local diffusers folder with model_index.json."""
    name = str(name_or_path).strip()
    if not name:
        raise ModelNotFoundError("no model given: use 'demo' or a local diffusers folder")
    if name == "demo":
        path = demo_model_dir()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the demo model is missing at {path}: it ships with the repository as "
                "assets/demo_model (restore it from git) or give a local diffusers Wan folder instead"
            )
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model not found: {name!r} is neither 'demo' nor an existing folder "
            "(weights are never downloaded; put a diffusers Wan folder on disk and give its path)"
        )
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a diffusers model folder (model_index.json missing); "
            "convert the checkpoint to the diffusers layout first"
        )
    return path.resolve()
