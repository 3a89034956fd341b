"""First-start preparation of the demo: the held-out concept's LoRA dataset in the data directory.

`ensure_demo_assets(data_dir)` is idempotent and fast after the first call: a marker written last
says the folder is complete, so a crash halfway simply rebuilds it on the next start.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from engine.demo import world

log = logging.getLogger(__name__)

DEMO_DATASET_NAME = "demo_purple_star"
DEMO_DATASET_CLIPS = 12  # every direction x background of "purple star" once
DEMO_DATASET_SEED = 2024
DEMO_LORA_TOML = Path(__file__).resolve().parents[2] / "examples" / "demo_lora.toml"
STUDIO_HOME_PLACEHOLDER = "${STUDIO_HOME}"
_MARKER = ".demo_dataset.json"
_VERSION = 1


def demo_dataset_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "datasets" / DEMO_DATASET_NAME


def ensure_demo_assets(data_dir: str | Path) -> Path:
    """Create datasets/demo_purple_star (clips + captions) under data_dir unless already complete."""
    folder = demo_dataset_dir(Path(data_dir))
    expected = {"version": _VERSION, "clips": DEMO_DATASET_CLIPS, "seed": DEMO_DATASET_SEED}
    marker = folder / _MARKER
    if marker.is_file() and _read_json(marker) == expected and _complete(folder):
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    specs = world.sample_specs(DEMO_DATASET_CLIPS, DEMO_DATASET_SEED, held_out=True)
    world.write_dataset(staging, specs, prefix="purple_star")
    (staging / _MARKER).write_text(json.dumps(expected), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)  # the folder appears complete or not at all
    log.info("prepared the demo LoRA dataset (%d clips) in %s", DEMO_DATASET_CLIPS, folder)
    return folder


def demo_lora_config_text(data_dir: str | Path, template: Path = DEMO_LORA_TOML) -> str:
    """examples/demo_lora.toml with ${STUDIO_HOME} replaced by the data directory (for the trainer CLI)."""
    return template.read_text(encoding="utf-8").replace(STUDIO_HOME_PLACEHOLDER, str(Path(data_dir).resolve()))


def _complete(folder: Path) -> bool:
    clips = sorted(folder.glob("*.mp4"))
    return len(clips) == DEMO_DATASET_CLIPS and all(c.with_suffix(".txt").is_file() for c in clips)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
