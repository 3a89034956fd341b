"""Scores for sample videos, and which save of a run is best.

A scorer reads a clip and its prompt and returns named scores in [0, 1] (higher is better). The demo
world has one that reads color, shape and motion from the pixels (engine.demo.evaluate); other
models have none yet (a CLIP-style text-video similarity would be the next). The best save is the
one whose samples scored highest ("all" first); without scores, the save at the lowest eval loss.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

__all__ = ["Scorer", "DemoWorldScorer", "scorer_for", "mean_scores", "best_save"]


class Scorer(Protocol):
    name: str

    def score(self, frames: np.ndarray, prompt: str) -> dict[str, float]:
        """frames (F, H, W, 3) uint8 -> {score name: value in [0, 1]}."""


class DemoWorldScorer:
    """The demo world's pixel evaluator: each attribute 1 when the clip shows what the prompt says in
    (nearly) every frame; `present`: an object in every frame (a clip that fades away fails "all")."""

    name = "demo-world"

    def score(self, frames: np.ndarray, prompt: str) -> dict[str, float]:
        from engine.demo.evaluate import evaluate_clip

        clip = evaluate_clip(frames, prompt)
        flags = {"color": clip.color_ok, "shape": clip.shape_ok, "motion": clip.motion_ok, "present": clip.present_ok}
        return {**{k: float(v) for k, v in flags.items()}, "all": float(clip.all_ok)}


def scorer_for(model: str) -> Scorer | None:
    """The scorer that fits a model ("demo": the pixel evaluator), or None."""
    return DemoWorldScorer() if str(model).strip() == "demo" else None


def mean_scores(per_video: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for scores in per_video for name in scores})
    return {name: round(float(np.mean([s[name] for s in per_video if name in s])), 4) for name in names}


def best_save(events: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """{label, step, why} of the best save: the highest sample score ("all", then the mean of the
    others; the later save on a tie), else the save nearest after the lowest eval loss."""
    samples, evals, saves = [], [], []
    for event in events:
        kind = event.get("event")
        if kind == "sample" and event.get("scores") and event.get("label") != "start":
            samples.append(event)
        elif kind == "eval" and event.get("loss") is not None:
            evals.append(event)
        elif kind == "save":
            saves.append(event)
    if samples:
        def rank(e: dict[str, Any]) -> tuple:
            scores = e["scores"]
            others = [v for k, v in scores.items() if k != "all"]
            return scores.get("all", 0.0), sum(others) / max(1, len(others)), e.get("step", 0)

        best = max(samples, key=rank)
        detail = ", ".join(f"{k} {v:.2f}" for k, v in best["scores"].items())
        return {"label": best["label"], "step": best.get("step"), "why": f"highest sample scores ({detail})"}
    if evals and saves:
        low = min(evals, key=lambda e: e["loss"])
        after = [s for s in saves if s.get("step", 0) >= low["step"]] or saves
        chosen = min(after, key=lambda s: s.get("step", 0))
        return {"label": chosen.get("label"), "step": chosen.get("step"),
                "why": f"lowest eval loss ({low['loss']:.4g} at step {low['step']})"}
    return None
