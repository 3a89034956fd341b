"""`python -m studio infer --model M --lora FILE:0.8 ... --prompt "..." [--out DIR] [--seed N ...]`.

Generates through the same service as the web UI (a warm worker placed by the scheduler, so it
never takes a GPU a training job holds); results land in the gallery, and in --out if given.
Ctrl-C cancels at the next denoising step; a second Ctrl-C stops at once. SIGTERM or a closed
terminal (SIGHUP) stop at once too: the request ends cancelled, the worker is killed and its
device reservation released (the worker also dies with this process if it is killed outright).
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
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    # Left out: the model's defaults (demo 64x64x17, 20 steps; Wan 832x480x81, 30 steps), as in the UI/API.
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="4k+1 frames (demo 17, Wan 81)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 5)")
    parser.add_argument("--flow-shift", type=float, default=None, help="default: the model's own (3 for Wan2.1)")
    parser.add_argument("--seed", type=int, default=None, help="random when left out (always recorded)")
    parser.add_argument("--fps", type=int, default=None, help="default 16")
    parser.add_argument("--num-videos", type=int, default=1)
    parser.add_argument("--fuse", action="store_true", help="merge the LoRA mix into the weights (faster steps)")
    parser.add_argument("--out", type=Path, help="also copy video, poster and sidecar here")
    parser.add_argument("--owner", default=None, help="gallery owner (default: your login name)")
    parser.add_argument("--json", action="store_true", help="print the final status as JSON")
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> InferRequest:
    return InferRequest.from_dict(dict(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt,
        loras=[LoraSpec.parse(text) for text in args.lora], width=args.width, height=args.height,
        num_frames=args.frames, steps=args.steps, guidance_scale=args.guidance, flow_shift=args.flow_shift,
        seed=args.seed, fps=args.fps, num_videos=args.num_videos, fuse_loras=args.fuse,
    ))


def run(args: argparse.Namespace, settings: StudioSettings) -> int:
    from engine.inference.service import TERMINAL_STATES
    from studio.services import open_services

    try:
        req = build_request(args).validate()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop_signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in stop_signals}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    services = open_services(settings)
    db, gallery, service = services.db, services.gallery, services.inference()
    force, request_id = False, None
    try:
        try:
            request_id = service.submit(req, owner=args.owner or _login())
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        status = _follow(service, request_id, TERMINAL_STATES)
        force = status.get("forced", False)
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
        if force and request_id is not None:
            status = service.status(request_id)
        db.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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


def _follow(service, request_id: str, terminal: frozenset[str]) -> dict:
    last = None
    try:
        while True:
            status = service.status(request_id)
            line = _progress_line(status)
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            if status["state"] in terminal:
                return status
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("cancelling at the next step (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)
        service.cancel(request_id)
        try:
            return service.wait(request_id)
        except KeyboardInterrupt:
            print("stopping now", file=sys.stderr, flush=True)
            return {**service.status(request_id), "forced": True}


def _progress_line(status: dict) -> str:
    if status["state"] != "running" or not status["step"]:
        return status["state"]
    eta = status["eta_s"]
    return f"step {status['step']}/{status['total_steps']}" + (f"  eta {eta:.0f}s" if eta is not None else "")


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
