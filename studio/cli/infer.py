"""`python -m studio infer --model M --lora FILE:0.8 ... --prompt "..." [--out DIR] [--seed N ...]`
   `python -m studio infer ... --compare lora=RUN/epoch1,RUN/epoch2 --compare seed=1,2` (a comparison).

Generates through the same service as the web UI (a warm worker placed by the scheduler, so it
never takes a GPU a training job holds); results land in the gallery, and in --out if given.
Ctrl-C cancels at the next denoising step; a second Ctrl-C stops at once. SIGTERM or a closed
terminal (SIGHUP) stop at once too: the request ends cancelled, the worker is killed and its
device reservation released (the worker also dies with this process if it is killed outright).
With --compare the request becomes a comparison (studio.compare): its cells are queued whole or not
at all, followed together, and cancelled together.
"""
from __future__ import annotations

import argparse
import getpass
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from engine.config import ConfigError
from engine.inference.request import InferRequest, LoraSpec
from studio.compare import Cell, CompareAxes, CompareStore, expand_cells, new_record, parse_axis, submit_cells
from studio.settings import StudioSettings

POLL_S = 0.25


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: stop now (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("infer", help="generate videos with a base model and a stack of LoRAs")
    parser.add_argument("--model", default="demo", help="'demo' or a local diffusers Wan folder (default: demo)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="a LoRA file, LoRA folder or run/epochN folder, optional weight (repeatable)")
    parser.add_argument("--prompt", required=True, help="what the video shows")
    parser.add_argument("--negative-prompt", default="", help="what it should not show")
    # Left out: the model's defaults (demo 64x64x17, 20 steps; Wan 832x480x81, 30 steps), as in the UI/API.
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--frames", type=int, default=None, help="4k+1 frames (demo 17, Wan 81)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: demo 20, Wan 30)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 5)")
    parser.add_argument("--flow-shift", type=float, default=None, help="default: the model's own (3 for Wan2.1)")
    parser.add_argument("--seed", type=int, default=None, help="random when left out (always recorded)")
    parser.add_argument("--fps", type=int, default=None, help="default 16")
    parser.add_argument("--num-videos", type=int, default=1, help="how many videos")
    parser.add_argument("--fuse", action="store_true", help="merge the LoRA mix into the weights (faster steps)")
    parser.add_argument("--image", type=Path, default=None,
                        help="start image of an image-to-video model (Wan I2V, Wan2.2 TI2V-5B)")
    parser.add_argument("--out", type=Path, help="also copy video, poster and sidecar here")
    parser.add_argument("--owner", default=None, help="gallery owner (default: your login name)")
    parser.add_argument("--json", action="store_true", help="print the final status as JSON")
    parser.add_argument("--compare", action="append", default=[], metavar="AXIS=V1,V2,...",
                        help="render over a grid (repeatable, at most 16 videos): lora=FILE,... (a run folder "
                             "ending in /* = each of its saves; 'none' = without), weight=0,0.5,1 (of the compared "
                             "LoRA, else the first --lora), seed=1,2,3")
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> InferRequest:
    return InferRequest.from_dict(dict(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt,
        loras=[LoraSpec.parse(text) for text in args.lora], width=args.width, height=args.height,
        num_frames=args.frames, steps=args.steps, guidance_scale=args.guidance, flow_shift=args.flow_shift,
        seed=args.seed, fps=args.fps, num_videos=args.num_videos, fuse_loras=args.fuse,
        image=str(args.image.expanduser().resolve()) if args.image else None,
    ))


def compare_axes(texts: list[str]) -> CompareAxes:
    """`--compare lora=A,B --compare weight=0,1 --compare seed=1,2` as axes; 'RUN/*' lists each save of a run."""
    from engine.rundir import RunDir

    values: dict[str, list] = {"lora": [], "weight": [], "seed": []}
    for text in texts:
        axis, sep, listed = text.partition("=")
        axis = axis.strip().lower().rstrip("s")
        if not sep or axis not in values:
            raise ValueError(f"--compare {text!r}: give lora=..., weight=... or seed=... with comma-separated values")
        if axis == "lora":
            for item in (part.strip() for part in listed.split(",") if part.strip()):
                saves = RunDir(item[:-2]).loras() if item.endswith("/*") else None
                if saves is not None and not saves:
                    raise ValueError(f"--compare lora={item}: no saved LoRA in {item[:-2]}")
                values["lora"] += [str(save.file) for save in saves] if saves else [item]
        else:
            values[axis] += parse_axis(listed, float if axis == "weight" else int, f"--compare {axis}")
    return CompareAxes(tuple(values["lora"]), tuple(values["weight"]), tuple(values["seed"]))


def build_cells(args: argparse.Namespace, compare_id: str) -> list[tuple[Cell, InferRequest]]:
    """The comparison's cells, each a checked request carrying the comparison's id."""
    from engine.inference.request import random_seed

    base = build_request(args).to_dict()
    base["loras"] = [{"path": spec["path"], "weight": spec["weight"]} for spec in base["loras"]]
    cells = expand_cells(base, compare_axes(args.compare), lora_key="path", seed_if_random=random_seed)
    return [(cell, InferRequest.from_dict({**cell.request, "compare_id": compare_id}).validate()) for cell in cells]


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    from engine.inference.service import TERMINAL_STATES
    from studio.services import open_services

    store = CompareStore(settings.home.resolve() / "compares") if args.compare else None
    compare_id = store.new_id() if store else None
    try:
        cells = build_cells(args, compare_id) if compare_id else [(None, build_request(args).validate())]
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    owner = args.owner or _login()
    stop_signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in stop_signals}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    services = open_services(settings)
    db, gallery, service = services.db, services.gallery, services.inference()
    force, request_ids = False, []
    try:
        try:
            request_ids = submit_cells([req for _, req in cells], lambda req: service.submit(req, owner=owner),
                                       service.cancel)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for warning in dict.fromkeys(service.status(rid).get("warning") for rid in request_ids):
            if warning:  # a long CPU request says so before it runs; it is not refused
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        if store:
            _record(store, compare_id, owner, args.prompt, cells, request_ids)
        statuses = _follow(service, request_ids, TERMINAL_STATES)
        force = any(status.get("forced", False) for status in statuses)
    except Terminated as exc:
        force = True
        print(f"{signal.Signals(exc.signum).name}: stopping", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except KeyboardInterrupt:  # a Ctrl-C before the request was queued
        force = True
        return 130
    finally:
        for sig in (*stop_signals, signal.SIGINT):  # the cleanup itself must not be interrupted
            signal.signal(sig, signal.SIG_IGN)
        service.shutdown(timeout_s=10.0 if force else 30.0, force=force)
        if force and request_ids:
            statuses = [service.status(request_id) for request_id in request_ids]
        db.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if compare_id:
        return _report_compare(gallery, compare_id, cells, statuses, args)
    (status,) = statuses
    if status["state"] != "succeeded":
        print(f"{status['state']}: {status['error'] or ''}".rstrip(": "), file=sys.stderr)
        return 1
    copied = _copy_out(gallery, status["gallery_ids"], args.out) if args.out else []
    if args.json:
        print(json.dumps({**status, "files": [str(p) for p in copied]}, default=str))
    else:
        for item_id in status["gallery_ids"]:
            item = gallery.get(item_id)
            print(f"{item.id}  seed {item.seed}  {item.video_path}")
        for path in copied:
            print(f"copied {path}")
        t = status["timings"]
        print("timings: " + ", ".join(f"{k[:-2]} {t[k]:.2f}s" for k in
                                      ("load_s", "lora_s", "text_encode_s", "denoise_s", "decode_s", "encode_s")
                                      if k in t))
    return 0


def _record(store: CompareStore, compare_id: str, owner: str, prompt: str,
            cells: list[tuple[Cell, InferRequest]], request_ids: list[str]) -> None:
    """The comparison's record, so the studio (UI, /compare_status) shows it like one made there."""
    record = new_record(store, owner, {"prompt": prompt}, [cell for cell, _ in cells], compare_id)
    record.cells = [{"row": cell.row, "column": cell.column, "request_id": rid}
                    for (cell, _), rid in zip(cells, request_ids)]
    store.save(record)


def _follow(service, request_ids: list[str], terminal: frozenset[str]) -> list[dict]:
    """Progress of every request until all ended; Ctrl-C cancels them all."""
    last = None
    try:
        while True:
            statuses = [service.status(request_id) for request_id in request_ids]
            line = _progress_line(statuses)
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            if all(status["state"] in terminal for status in statuses):
                return statuses
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("cancelling at the next step (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)
        try:  # a second press may land while the cancels are still being sent
            for request_id in request_ids:
                service.cancel(request_id)
            return [service.wait(request_id) for request_id in request_ids]
        except KeyboardInterrupt:
            print("stopping now", file=sys.stderr, flush=True)
            return [{**service.status(request_id), "forced": True} for request_id in request_ids]


def _progress_line(statuses: list[dict]) -> str:
    """One request: its state or step; several: how many are done and the running one's step."""
    running = next((s for s in statuses if s["state"] == "running" and s["step"]), None)
    step = ""
    if running:
        eta = running["eta_s"]
        step = f"step {running['step']}/{running['total_steps']}" + (f"  eta {eta:.0f}s" if eta is not None else "")
    if len(statuses) == 1:
        return step or statuses[0]["state"]
    done = sum(s["state"] in ("succeeded", "failed", "cancelled", "lost") for s in statuses)
    return f"{done}/{len(statuses)} videos done" + (f"  ({step})" if step else "")


def _report_compare(gallery, compare_id: str, cells: list[tuple[Cell, InferRequest]], statuses: list[dict],
                    args: argparse.Namespace) -> int:
    """A line (or JSON) per cell: row, column, state, gallery item and video; 1 unless every cell succeeded."""
    rows = []
    for (cell, _), status in zip(cells, statuses):
        files = _copy_out(gallery, status["gallery_ids"], args.out) if args.out else []
        videos = [str(gallery.get(i).video_path) for i in status["gallery_ids"]]
        rows.append({"row": cell.row, "column": cell.column, "state": status["state"], "error": status["error"],
                     "request_id": status["id"], "gallery_ids": status["gallery_ids"], "videos": videos,
                     "files": [str(p) for p in files]})
    if args.json:
        print(json.dumps({"compare_id": compare_id, "cells": rows}, default=str))
    else:
        print(f"comparison {compare_id}")
        for row in rows:
            where = row["videos"][0] if row["videos"] else (row["error"] or "")
            print(f"{row['row']} | {row['column']} | {row['state']} | {' '.join(row['gallery_ids'])} | {where}")
    return 0 if all(row["state"] == "succeeded" for row in rows) else 1


def _copy_out(gallery, ids: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for item_id in ids:
        item = gallery.get(item_id)
        for source, suffix in ((item.video_path, ".mp4"), (item.poster_path, ".png"), (item.meta_path, ".json")):
            if source.is_file():
                target = out / f"{item.id}{suffix}"
                shutil.copyfile(source, target)
                copied.append(target)
    return copied


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "cli"
