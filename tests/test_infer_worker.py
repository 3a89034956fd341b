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


def test_split_phases_give_what_a_plain_wanpipeline_call_gives() -> None:
    """Text encode + denoise + decode as separate timed phases change nothing in the frames."""
    import numpy as np

    from engine.inference.pipeline import PipelineCache, encode_text, generate
    from engine.models import resolve_model

    cache = PipelineCache("cpu")
    loaded, load_s = cache.get(resolve_model("demo"))
    assert load_s > 0 and cache.get(resolve_model("demo"))[1] == 0.0
    device = torch.device("cpu")
    prompt, negative = "a green circle moving down on a gray background", "blurry"
    positive, negative_embeds, _ = encode_text(loaded, prompt, negative, 4.0, device)
    ours = generate(loaded, prompt_embeds=positive, negative_embeds=negative_embeds, width=32, height=32,
                    num_frames=5, steps=3, guidance_scale=4.0, flow_shift=2.0, seed=7, device=device).frames
    with torch.inference_mode():
        plain = loaded.pipe(prompt=prompt, negative_prompt=negative, width=32, height=32, num_frames=5,
                            num_inference_steps=3, guidance_scale=4.0,
                            generator=torch.Generator("cpu").manual_seed(7)).frames[0]
    assert ours.shape == plain.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(ours, plain, atol=1e-5)


def test_step_cache_skips_transformer_blocks_and_still_generates() -> None:
    """With First Block Cache on, steps whose first block barely changed skip the other blocks: fewer
    block calls than the exact pipeline, a clip of the requested shape, and the cache state is reset
    per request (a second run of the same seed gives the same frames)."""
    import numpy as np

    from engine.inference.pipeline import PipelineCache, encode_text, generate
    from engine.inference.speed import InferenceSpeed
    from engine.models import resolve_model

    def run(cache: PipelineCache) -> tuple[np.ndarray, int]:
        loaded, _ = cache.get(resolve_model("demo"))
        calls = []
        # Hooks on each block's feed-forward: a skipped block returns its cached residual without running it.
        blocks = loaded.pipe.transformer.blocks
        hooks = [block.ffn.register_forward_hook(lambda *_: calls.append(1)) for block in blocks]
        positive, negative, _ = encode_text(loaded, "a red square moving up on a black background", "", 5.0,
                                            torch.device("cpu"))
        # Small and short (seconds, not a minute), yet the late steps change little enough to skip blocks.
        frames = generate(loaded, prompt_embeds=positive, negative_embeds=negative, width=32, height=32,
                          num_frames=5, steps=12, guidance_scale=5.0, flow_shift=2.0, seed=3,
                          device=torch.device("cpu")).frames
        for hook in hooks:
            hook.remove()
        return frames, len(calls)

    exact, exact_calls = run(PipelineCache("cpu"))
    cached = PipelineCache("cpu", speed=InferenceSpeed(step_cache=0.3))
    fast, fast_calls = run(cached)
    again, _ = run(cached)
    assert exact_calls == 12 * 2 * 6  # steps x (cond, uncond) x blocks
    assert fast.shape == exact.shape == (5, 32, 32, 3)
    assert fast_calls < exact_calls, f"no block was skipped ({fast_calls} of {exact_calls} calls)"
    np.testing.assert_allclose(again, fast, atol=1e-6)


def test_worker_takes_speed_flags_and_refuses_a_bad_threshold(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}

    def start(*flags: str) -> tuple[list[dict], int]:
        proc = spawn_process([sys.executable, "-m", "engine.inference.worker", "--device", "cpu", *flags], cwd=REPO,
                             env=env, log_path=tmp_path / "worker.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = proc.communicate(json.dumps({"op": "shutdown"}).encode() + b"\n", timeout=240)
        return [json.loads(line) for line in out.decode().splitlines()], proc.returncode

    # flash3 is accepted here: the kernel choice happens at model load.
    events, code = start("--compile-blocks", "--step-cache", "0.1", "--attention", "flash3")
    assert [e["event"] for e in events] == ["ready"] and code == 0
    events, code = start("--step-cache", "1.5")
    assert events[0]["event"] == "fatal" and "step_cache" in events[0]["message"] and code == 1
    events, code = start("--attention", "flash9")
    assert events[0]["event"] == "fatal" and "attention" in events[0]["message"] and code == 1


def test_flash3_where_it_cannot_run_says_why_and_generates_the_exact_clip(caplog) -> None:
    import logging

    import numpy as np

    from engine.inference.pipeline import PipelineCache, encode_text, generate
    from engine.inference.speed import InferenceSpeed
    from engine.models import resolve_model

    def clip(cache: PipelineCache) -> np.ndarray:
        loaded, _ = cache.get(resolve_model("demo"))
        positive, negative, _ = encode_text(loaded, "a blue square moving left on a white background", "", 4.0,
                                            torch.device("cpu"))
        return generate(loaded, prompt_embeds=positive, negative_embeds=negative, width=32, height=32,
                        num_frames=5, steps=3, guidance_scale=4.0, flow_shift=2.0, seed=5,
                        device=torch.device("cpu")).frames

    with caplog.at_level(logging.WARNING, logger="engine.inference.pipeline"):
        fallback = clip(PipelineCache("cpu", speed=InferenceSpeed(attention="flash3")))
    assert "attention flash3: FlashAttention-3 needs a CUDA GPU; using PyTorch's SDPA" in caplog.text
    np.testing.assert_allclose(fallback, clip(PipelineCache("cpu")), atol=1e-6)
