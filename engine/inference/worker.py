"""The inference worker: a long-lived process that keeps pipelines warm and serves requests.

    python -m engine.inference.worker [--device auto|cpu|cuda] [--idle-timeout S] [--compile-blocks]
                                      [--step-cache THRESHOLD] [--attention default|flash3]

Protocol: JSON lines. The service writes commands to stdin:
    {"op": "generate", "id": ID, "request": {...InferRequest with seed...}, "model_path": DIR,
     "lora_files": [FILE, ...], "out_dir": DIR}
    {"op": "cancel", "id": ID}          stop that request at its next denoising step
    {"op": "load", "model_path": DIR}   load a model ahead of requests (a worker coming back warm)
    {"op": "shutdown"}                  (or end of stdin) free everything and exit 0
and reads events from stdout, one JSON object per line, each with "event":
    ready {pid, device} · state {id, state} · step {id, step, total_steps, eta_s, video}
    · video {id, index, dir, seed, digest, timings} · done {id, timings} · cancelled {id}
    · error {id, message, kind} · unloaded {models} · loaded {model_path, load_s}
A bad request (unreadable LoRA, LoRA of another family, out of memory, any exception) ends in an
`error` event for that request only; the worker then serves the next one. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from engine.inference.speed import InferenceSpeed

log = logging.getLogger("engine.inference.worker")


class EventWriter:
    """Serialises events onto the protocol stream (the step callback and the main loop both write)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class CommandReader(threading.Thread):
    """Reads stdin: generate commands go to a queue, cancels are recorded at once (mid-generation)."""

    def __init__(self, stream: TextIO, emit: EventWriter) -> None:
        super().__init__(daemon=True, name="worker-stdin")
        self.stream = stream
        self.emit = emit
        self.jobs: queue.Queue[dict | None] = queue.Queue()
        self.cancelled: set[str] = set()

    def run(self) -> None:
        for line in self.stream:
            line = line.strip()
            if not line:
                continue
            try:
                command = json.loads(line)
                op = command["op"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.emit("error", id=None, message=f"unreadable command: {line[:200]}", kind="protocol")
                continue
            if op == "cancel":
                self.cancelled.add(str(command.get("id")))
            elif op in ("generate", "load"):
                self.jobs.put(command)
            elif op == "shutdown":
                break
            else:
                self.emit("error", id=command.get("id"), message=f"unknown op {op!r}", kind="protocol")
        self.jobs.put(None)  # end of stdin or shutdown


class Worker:
    def __init__(self, device: str, idle_timeout_s: float, emit: EventWriter, reader: CommandReader,
                 speed: InferenceSpeed = InferenceSpeed()) -> None:
        import diffusers.pipelines.wan.pipeline_wan  # noqa: F401 - import once at start-up, not in load_s
        import torch

        from engine.inference.pipeline import PipelineCache

        from engine.threads import apply_thread_policy

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # torch's default (a thread per core) oversubscribes the cores a trainer and the app share.
        self.threads = apply_thread_policy("inference")
        self.cache = PipelineCache(self.device, speed=speed)
        self.idle_timeout_s = idle_timeout_s
        self.emit = emit
        self.reader = reader

    def computing(self) -> contextlib.AbstractContextManager:
        """On the CPU, a generation tells trainers to give back the cores they use alone (engine/threads.py)."""
        from engine.threads import ComputeMark

        return ComputeMark("inference") if self.device.type == "cpu" else contextlib.nullcontext()

    def announce(self) -> None:
        self.emit("ready", pid=os.getpid(), device=str(self.device), threads=self.threads)

    def serve(self) -> None:
        while True:
            try:
                command = self.reader.jobs.get(timeout=min(5.0, self.idle_timeout_s))
            except queue.Empty:
                freed = self.cache.free_idle(self.idle_timeout_s)
                if freed:
                    self.emit("unloaded", models=freed)
                continue
            if command is None:
                break
            self.handle(command)
        self.cache.free_all()

    def handle(self, command: dict) -> None:
        if command.get("op") == "load":
            self.preload(str(command.get("model_path")))
            return
        request_id = str(command.get("id"))
        try:
            with self.computing():
                timings = self.run_request(request_id, command)
        except _Cancel:
            self.emit("cancelled", id=request_id)
        except Exception as exc:  # one request fails; the worker stays up for the next
            kind, message = describe_failure(exc)
            log.error("request %s failed: %s\n%s", request_id, message, traceback.format_exc())
            self.emit("error", id=request_id, message=message, kind=kind)
            self.recover_memory()
        else:
            self.emit("done", id=request_id, timings=timings)
        finally:
            self.reader.cancelled.discard(request_id)

    def preload(self, model_path: str) -> None:
        """Load a model before any request names it: the next generation finds it warm."""
        try:
            _, load_s = self.cache.get(model_path)
        except Exception as exc:  # the next request loads it (and reports why) instead
            kind, message = describe_failure(exc)
            log.error("preloading %s failed: %s", model_path, message)
            self.emit("error", id=None, message=message, kind=kind)
            return
        self.emit("loaded", model_path=model_path, load_s=load_s)

    def run_request(self, request_id: str, command: dict) -> dict:
        from engine.inference.export import (POSTER_FILE, VIDEO_FILE, frames_digest, to_uint8, write_display_mp4,
                                             write_mp4, write_poster)
        from engine.inference.pipeline import Cancelled, encode_text, generate

        req = command["request"]
        stop = lambda: request_id in self.reader.cancelled  # noqa: E731
        if stop():
            raise _Cancel()
        self.emit("state", id=request_id, state="loading")
        loaded, load_s = self.cache.get(command["model_path"])
        loras = list(zip(command.get("lora_files", []), [s["weight"] for s in req.get("loras", [])]))
        lora_s = self.cache.apply_loras(loaded, loras, fuse=bool(req.get("fuse_loras")))
        self.emit("state", id=request_id, state="running")
        positive, negative, text_s = encode_text(loaded, req["prompt"], req.get("negative_prompt", ""),
                                                 float(req["guidance_scale"]), self.device)
        timings = {"load_s": load_s, "lora_s": lora_s, "text_encode_s": text_s, "denoise_s": 0.0,
                   "decode_s": 0.0, "encode_s": 0.0, "videos": []}
        steps, count = int(req["steps"]), int(req["num_videos"])
        image = _start_image(req.get("image"))
        out_dir = Path(command["out_dir"])
        for index in range(count):
            seed = int(req["seed"]) + index
            on_step = self._progress(request_id, index, count, steps)
            try:
                result = generate(loaded, prompt_embeds=positive, negative_embeds=negative, width=int(req["width"]),
                                  height=int(req["height"]), num_frames=int(req["num_frames"]), steps=steps,
                                  guidance_scale=float(req["guidance_scale"]), flow_shift=float(req["flow_shift"]),
                                  seed=seed, device=self.device, on_step=on_step, should_stop=stop, image=image)
            except Cancelled:
                raise _Cancel() from None
            started = time.perf_counter()
            frames = to_uint8(result.frames)
            video_dir = out_dir / str(index)
            video_dir.mkdir(parents=True, exist_ok=True)
            write_mp4(frames, video_dir / VIDEO_FILE, fps=int(req["fps"]))
            write_display_mp4(frames, video_dir, fps=int(req["fps"]))
            write_poster(frames[len(frames) // 2], video_dir / POSTER_FILE)
            encode_s = time.perf_counter() - started
            video_timings = {"load_s": load_s if index == 0 else 0.0, "lora_s": lora_s if index == 0 else 0.0,
                             "text_encode_s": text_s if index == 0 else 0.0, "denoise_s": result.denoise_s,
                             "decode_s": result.decode_s, "encode_s": encode_s}
            for key in ("denoise_s", "decode_s", "encode_s"):
                timings[key] += video_timings[key]
            timings["videos"].append(video_timings)
            self.emit("video", id=request_id, index=index, dir=str(video_dir), seed=seed,
                      digest=frames_digest(frames), timings=video_timings)
        return timings

    def _progress(self, request_id: str, index: int, count: int, steps: int):
        total = steps * count

        def on_step(step: int, _steps: int, elapsed_s: float) -> None:
            done = index * steps + step
            per_step = elapsed_s / step
            self.emit("step", id=request_id, step=done, total_steps=total, eta_s=per_step * (total - done),
                      video=index)

        return on_step

    def recover_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _Cancel(Exception):
    pass


def _start_image(path: str | None) -> Any:
    """The request's start image (image-to-video) as an RGB PIL image, or None."""
    if not path:
        return None
    from PIL import Image

    with Image.open(Path(path).expanduser()) as img:
        return img.convert("RGB")


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for a failed request: kinds are lora, model, oom, error."""
    from engine.inference.pipeline import LoraLoadError
    from engine.models import ModelNotFoundError

    if isinstance(exc, LoraLoadError):
        return "lora", str(exc)
    if isinstance(exc, ModelNotFoundError):
        return "model", str(exc)
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return "oom", ("out of memory: " + text.splitlines()[0][:300] +
                       " (lower width/height, frames or the number of videos, or free the GPU)")
    return "error", f"{type(exc).__name__}: {text.splitlines()[0][:500] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="warm inference worker (JSON lines on stdin/stdout)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--idle-timeout", type=float, default=600.0, help="free a model unused this many seconds")
    parser.add_argument("--compile-blocks", action="store_true", help="torch.compile each transformer block (CUDA)")
    parser.add_argument("--step-cache", type=float, default=0.0, help="First Block Cache threshold (0 = off)")
    parser.add_argument("--attention", default="default", help="default or flash3 (FlashAttention-3, Hopper GPUs)")
    args = parser.parse_args(argv)
    # stdout carries the protocol only: anything a library prints goes to stderr (the log file).
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emit = EventWriter(protocol)
    reader = CommandReader(sys.stdin, emit)
    try:
        speed = InferenceSpeed(compile_blocks=args.compile_blocks, step_cache=args.step_cache, attention=args.attention)
        worker = Worker(args.device, args.idle_timeout, emit, reader, speed)
        worker.announce()
        reader.start()  # only after "ready": the reader's protocol errors must never come first
        worker.serve()
    except Exception as exc:  # start-up failure (no torch, no CUDA): tell the service, then exit
        emit("fatal", message=f"{type(exc).__name__}: {exc}")
        log.exception("worker failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
