"""Compare: one prompt and seed rendered over a grid of choices, without Gradio.

A comparison takes a generation request (prompt, model, size, seed, LoRA stack) and up to three
axes: LoRAs (rows: checkpoints of a run, uploads, "none" for the base model), weights of the compared
LoRA and seeds (columns). It expands to at most MAX_CELLS cells, each one video, and is submitted as
one unit: every cell is checked and queued at once, and a cell refused by the service takes the
cells queued before it out of the queue again, so a comparison is queued whole or not at all. The
cells then run as consecutive generation requests on the warm workers (the pipeline stays loaded;
only the LoRA changes between cells). Each request carries `compare_id`, so each video lands in the
gallery with the comparison's id among its parameters.

The record (rows, columns, which request draws which cell) is a small JSON file under the data
directory's `compares/`; the state of each cell is read from its request. The web API
(CompareApi, mixed into studio.api.StudioApi), the CLI (`infer --compare`) and MCP share this module.
"""
from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.inference.tracking import TERMINAL_STATES

log = logging.getLogger(__name__)

__all__ = ["MAX_CELLS", "NO_LORA", "CompareAxes", "Cell", "CompareRecord", "CompareStore", "expand_cells",
           "submit_cells", "compare_view", "parse_axis", "CompareApi"]

MAX_CELLS = 16  # videos per comparison: as many as one request may ask for (num_videos)
NO_LORA = "none"  # a row without the compared LoRA: the base model (with the rest of the stack)


@dataclass(frozen=True)
class CompareAxes:
    """The choices a comparison runs over; an empty axis is not varied."""

    loras: tuple[str, ...] = ()  # LoRA references (API: 'job:ID/epochN', 'upload:NAME'; CLI: files), or "none"
    weights: tuple[float, ...] = ()  # weights of the compared LoRA
    seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(dict.fromkeys(str(r).strip() for r in self.loras if str(r).strip())))
        object.__setattr__(self, "weights", tuple(dict.fromkeys(float(w) for w in self.weights)))
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(int(s) for s in self.seeds)))


@dataclass
class Cell:
    row: str
    column: str
    request: dict[str, Any]


def parse_axis(text: str | Iterable[Any] | None, kind: type, name: str) -> list[Any]:
    """'0, 0.5, 1' (or a list) -> numbers; a bad entry is named."""
    if text is None:
        return []
    parts = [p for p in (str(text).replace(";", ",").split(",") if isinstance(text, str) else text)]
    values = []
    for part in parts:
        part = str(part).strip()
        if not part:
            continue
        try:
            values.append(kind(float(part)) if kind is int and float(part).is_integer() else kind(part))
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a {'whole number' if kind is int else 'number'}") from None
    return values


def lora_label(reference: str) -> str:
    """A short row label: 'job:3/epoch2' -> '#3 epoch2', 'upload:a.safetensors' -> 'a', a path -> its last parts."""
    if reference == NO_LORA:
        return "no LoRA"
    if reference.startswith("job:"):
        job, _, save = reference[4:].partition("/")
        return f"#{job} {save or 'newest'}"
    if reference.startswith("upload:"):
        return Path(reference[7:]).stem
    path = Path(reference)
    return "/".join(path.parts[-2:]) if path.suffix == ".safetensors" else path.name


def expand_cells(base: dict[str, Any], axes: CompareAxes, *, lora_key: str = "lora",
                 seed_if_random: Callable[[], int] | None = None) -> list[Cell]:
    """The cells of a comparison: rows are the compared LoRAs (or the stack as it is), columns the
    weights x seeds. `base["loras"]` is the stack, [{lora_key: ref, "weight": w}]; a compared LoRA goes
    first in each row's stack (at its stack weight, else 1, unless weights vary). A random seed is
    drawn once, so every cell starts from the same noise."""
    stack = list(base.get("loras") or [])
    if axes.weights and not axes.loras and not stack:
        raise ValueError("weights vary a LoRA: choose LoRAs to compare or put one in the stack")
    if axes.weights and NO_LORA in axes.loras:
        raise ValueError("'none' (the base model) has no weight to vary: compare it over seeds only")
    rows: list[str | None] = list(axes.loras) or [None]
    weights: list[float | None] = list(axes.weights) or [None]
    seed = base.get("seed")
    if seed is None or (isinstance(seed, int) and seed < 0):
        seed = seed_if_random() if seed_if_random else None
    seeds: list[int | None] = list(axes.seeds) or [seed]
    count = len(rows) * len(weights) * len(seeds)
    if count > MAX_CELLS:
        raise ValueError(f"{count} videos ({len(rows)} LoRAs x {len(weights)} weights x {len(seeds)} seeds); "
                         f"a comparison makes at most {MAX_CELLS}")
    if count < 2:
        raise ValueError("a comparison needs at least two choices: LoRAs, weights or seeds")
    # The stack's other LoRAs stay in every cell; the compared ones appear only in their own row.
    compared_refs = set(axes.loras) or ({stack[0][lora_key]} if axes.weights else set())
    rest = [dict(item) for item in stack if item[lora_key] not in compared_refs]
    cells = []
    for row, weight, cell_seed in itertools.product(rows, weights, seeds):
        compared = row if row is not None else (stack[0][lora_key] if axes.weights else None)
        cells.append(Cell(row=lora_label(row) if row else "stack",
                          column=_column_label(weight if axes.weights else None, cell_seed if axes.seeds else None),
                          request={**base, "seed": cell_seed, "num_videos": 1,
                                   "loras": _row_stack(stack, rest, compared, weight, lora_key)}))
    return cells


def _row_stack(stack: list[dict[str, Any]], rest: list[dict[str, Any]], compared: str | None, weight: float | None,
               lora_key: str) -> list[dict[str, Any]]:
    if compared is None:
        return [dict(item) for item in stack]
    if compared == NO_LORA:
        return rest
    stacked = next((item.get("weight", 1.0) for item in stack if item[lora_key] == compared), 1.0)
    return [{lora_key: compared, "weight": stacked if weight is None else weight}, *rest]


def _column_label(weight: float | None, seed: int | None) -> str:
    parts = ([f"weight {weight:g}"] if weight is not None else []) + ([f"seed {seed}"] if seed is not None else [])
    return " · ".join(parts) or "as set"


def submit_cells(requests: list[Any], submit: Callable[[Any], str], cancel: Callable[[str], None]) -> list[str]:
    """Queue every cell's request; if one is refused, the ones already queued are cancelled and the
    refusal is raised: a comparison is queued whole or not at all."""
    queued: list[str] = []
    try:
        for request in requests:
            queued.append(submit(request))
    except Exception:
        for request_id in queued:
            try:
                cancel(request_id)
            except Exception:  # noqa: BLE001 - best effort: the refusal is what the caller must see
                log.exception("could not take compare cell %s back out of the queue", request_id)
        raise
    return queued


# ---- records -----------------------------------------------------------------------------------------
@dataclass
class CompareRecord:
    id: str
    owner: str
    created_at: float
    prompt: str
    rows: list[str]
    columns: list[str]
    cells: list[dict[str, Any]] = field(default_factory=list)  # {row, column, request_id}


class CompareStore:
    """One JSON file per comparison under `root` (the data directory's compares/)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def new_id(self) -> str:
        return secrets.token_hex(6)

    def save(self, record: CompareRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"{record.id}.json"
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(asdict(record)), encoding="utf-8")
        partial.replace(target)  # whole or absent

    def get(self, compare_id: str) -> CompareRecord:
        name = str(compare_id)
        if not name.isalnum():
            raise KeyError(compare_id)
        try:
            return CompareRecord(**json.loads((self.root / f"{name}.json").read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise KeyError(compare_id) from None


def new_record(store: CompareStore, owner: str, base: dict[str, Any], cells: list[Cell],
               compare_id: str | None = None) -> CompareRecord:
    return CompareRecord(id=compare_id or store.new_id(), owner=owner, created_at=time.time(),
                         prompt=str(base.get("prompt", "")),
                         rows=list(dict.fromkeys(c.row for c in cells)),
                         columns=list(dict.fromkeys(c.column for c in cells)))


def compare_view(record: CompareRecord, status_of: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The comparison as the UI, API and CLI show it: its state, progress and every cell's request."""
    cells, step, total = [], 0, 0
    for cell in record.cells:
        try:
            status = status_of(cell["request_id"])
        except Exception:  # noqa: BLE001 - a request forgotten by the store
            status = {"state": "lost", "error": "request not found"}
        step += int(status.get("step") or 0)
        total += int(status.get("total_steps") or 0)
        cells.append({**cell, "state": status.get("state"), "gallery_ids": list(status.get("gallery_ids") or []),
                      "seed": (status.get("request") or {}).get("seed"), "error": status.get("error")})
    states = [c["state"] for c in cells]
    if any(s not in TERMINAL_STATES for s in states):
        state = "running" if any(s in ("loading", "running") for s in states) else "queued"
    else:
        state = "succeeded" if all(s == "succeeded" for s in states) else (
            "cancelled" if all(s == "cancelled" for s in states) else "finished with errors")
    return {"compare_id": record.id, "owner": record.owner, "prompt": record.prompt, "rows": record.rows,
            "columns": record.columns, "state": state, "done": sum(s == "succeeded" for s in states),
            "step": step, "total_steps": total, "cells": cells}


# ---- the web API's part ------------------------------------------------------------------------------
class CompareApi:
    """Mixed into studio.api.StudioApi: uses its `ctx`, `generate`, `generation_status`,
    `cancel_generation` and `job_lora_files`."""

    @property
    def compares(self) -> CompareStore:
        return CompareStore(self.ctx.layout.home / "compares")

    def compare(self, user: Any, request: dict[str, Any], loras: Iterable[str] = (), weights: Iterable[Any] = (),
                seeds: Iterable[Any] = ()) -> dict[str, Any]:
        """Queue a comparison; `request` is what /generate takes; loras may name 'job:ID/*' (every save)."""
        from engine.inference.request import random_seed

        axes = CompareAxes(tuple(self._every_save(user, loras)), tuple(parse_axis(list(weights), float, "weights")),
                           tuple(parse_axis(list(seeds), int, "seeds")))
        store = self.compares
        cells = expand_cells(dict(request), axes, seed_if_random=random_seed)
        record = new_record(store, user.name, request, cells)
        for cell in cells:
            cell.request["compare_id"] = record.id
        ids = submit_cells([cell.request for cell in cells], lambda req: self.generate(user, req)["request_id"],
                           lambda rid: self.cancel_generation(user, rid))
        record.cells = [{"row": c.row, "column": c.column, "request_id": rid} for c, rid in zip(cells, ids)]
        store.save(record)
        log.info("user %s queued comparison %s: %d videos", user.name, record.id, len(ids))
        return self.compare_status(user, record.id)

    def _every_save(self, user: Any, loras: Iterable[str]) -> list[str]:
        expanded = []
        for ref in loras:
            ref = str(ref).strip()
            if ref.startswith("job:") and ref.endswith("/*"):
                job = ref[4:-2]
                saves = [label for label, _ in self.job_lora_files(user, job)]
                if not saves:
                    raise FileNotFoundError(f"{ref}: job {job} has no saved LoRA yet")
                expanded += [f"job:{job}/{label}" for label in saves]
            elif ref:
                expanded.append(ref)
        return expanded

    def _own_compare(self, user: Any, compare_id: str) -> CompareRecord:
        from studio.auth import AccessDenied

        try:
            record = self.compares.get(compare_id)
        except KeyError:
            raise AccessDenied(f"comparison {compare_id} not found") from None
        self.ctx.accounts.check_owner(user, record.owner, f"comparison {compare_id}")
        return record

    def compare_status(self, user: Any, compare_id: str) -> dict[str, Any]:
        return compare_view(self._own_compare(user, compare_id), lambda rid: self.generation_status(user, rid))

    def cancel_compare(self, user: Any, compare_id: str) -> dict[str, Any]:
        for cell in self._own_compare(user, compare_id).cells:
            try:
                self.cancel_generation(user, cell["request_id"])
            except Exception:  # noqa: BLE001 - one cell gone must not keep the others running
                log.warning("could not cancel compare cell %s", cell["request_id"])
        return self.compare_status(user, compare_id)
