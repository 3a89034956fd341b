"""The worker program on its own: it answers garbage and failing requests with error events, keeps
serving, and exits cleanly on shutdown. Failure messages name the cause and the way out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.inference.pipeline import LoraLoadError
from engine.inference.worker import describe_failure
from engine.launcher import spawn_process

REPO = Path(__file__).resolve().parent.parent


def test_worker_answers_bad_commands_and_keeps_serving(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = spawn_process([sys.executable, "-m", "engine.inference.worker", "--device", "cpu"], cwd=REPO, env=env,
                         log_path=tmp_path / "worker.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    request = {"prompt": "x", "loras": [], "guidance_scale": 5.0, "steps": 2, "num_videos": 1, "seed": 1}
    commands = ["this is not json", json.dumps({"op": "dance"}),
                json.dumps({"op": "generate", "id": "r1", "request": request, "model_path": str(tmp_path / "gone"),
                            "lora_files": [], "out_dir": str(tmp_path / "out")}),
                json.dumps({"op": "shutdown"})]
    out, _ = proc.communicate("\n".join(commands).encode() + b"\n", timeout=240)
    events = [json.loads(line) for line in out.decode().splitlines()]
    kinds = [(e["event"], e.get("kind")) for e in events]
    assert kinds[0] == ("ready", None)
    assert ("error", "protocol") in kinds and kinds.count(("error", "protocol")) == 2
    r1 = [e for e in events if e.get("id") == "r1"]
    assert [e["event"] for e in r1] == ["state", "error"] and "gone" in r1[-1]["message"]
    assert proc.returncode == 0


def test_failure_kinds_and_messages() -> None:
    kind, message = describe_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert kind == "oom" and "lower width/height" in message
    assert describe_failure(LoraLoadError("/x/a.safetensors: truncated")) == ("lora", "/x/a.safetensors: truncated")
    assert describe_failure(RuntimeError("boom")) == ("error", "RuntimeError: boom")
