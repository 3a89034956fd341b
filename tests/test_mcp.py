"""The studio's MCP server driven by a real MCP client over stdio (`python -m studio mcp`): the tools an
agent sees, a refused action as a tool error with the studio's words, a training job started, watched
and stopped, and a video generated and found in the gallery."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from engine.paths import REPO_ROOT
from tests.ui_support import base_model, train_toml, write_dataset

EXPECTED_TOOLS = {"whoami", "check_config", "check_dataset", "start_training", "list_jobs", "job_status", "job_log",
                  "control_job", "generate", "generation_status", "compare", "compare_status", "gallery_list",
                  "gpu_status"}


def answer(result: Any) -> Any:
    """A tool's JSON answer (structured, else its text); a tool error raises with its text."""
    text = "".join(getattr(block, "text", "") for block in result.content)
    if result.is_error:
        raise AssertionError(f"tool error: {text}")
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if isinstance(content, dict) and set(content) == {"result"} else content
    return json.loads(text) if text.strip()[:1] in "[{" else text


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    return answer(await session.call_tool(tool, arguments))


async def until(predicate, timeout: float, what: str, interval: float = 0.5) -> Any:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


async def agent_session(home: Path, model: str, dataset: Path) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "studio", "--home", str(home), "mcp"],
                                   cwd=str(REPO_ROOT), env={**os.environ, "STUDIO_HOME": str(home)})
    with open(home / "mcp.stderr.log", "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            assert EXPECTED_TOOLS <= tools, tools
            assert (await call(session, "whoami"))["admin"] is True  # a single-user studio: the local user

            refused = await session.call_tool("job_status", {"job_id": 10**20})
            text = "".join(getattr(b, "text", "") for b in refused.content)
            assert refused.is_error and "job id must be" in text and "Traceback" not in text
            bad = await session.call_tool("check_config", {"config_toml": train_toml(model, dataset).replace(
                "lr = 1e-3", "lr = -1")})
            assert bad.is_error and "optimizer.lr" in "".join(getattr(b, "text", "") for b in bad.content)

            toml = train_toml(model, dataset, epochs=200)
            assert (await call(session, "check_config", config_toml=toml))["ok"]
            preview = await call(session, "check_dataset", config_toml=toml)
            assert preview["steps_per_epoch"] >= 1
            job = await call(session, "start_training", config_toml=toml, name="agent-run")

            async def trained() -> dict | None:
                status = await call(session, "job_status", job_id=job["id"])
                return status if (status.get("step") or 0) >= 2 else None

            running = await until(trained, 180, "two training steps")
            assert running["status"] == "running" and "best_save" in running
            assert "step" in await call(session, "job_log", job_id=job["id"], lines=200)
            await call(session, "control_job", job_id=job["id"], action="stop")

            async def ended() -> dict | None:
                status = await call(session, "job_status", job_id=job["id"])
                return status if status["terminal"] else None

            assert (await until(ended, 120, "the job to stop"))["status"] == "stopped"

            request = await call(session, "generate", prompt="a red square moving right on a white background",
                                 model="demo", num_frames=5, steps=2, seed=1)

            async def generated() -> dict | None:
                status = await call(session, "generation_status", request_id=request["request_id"])
                assert status["state"] not in ("failed", "cancelled"), status
                return status if status["state"] == "succeeded" else None

            done = await until(generated, 240, "the video")
            listing = await call(session, "gallery_list")
            assert done["gallery_ids"][0] in [item["id"] for item in listing["items"]]


@pytest.mark.slow
def test_an_agent_trains_watches_stops_and_generates_through_mcp(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    model = base_model(tmp_path)
    dataset = write_dataset(home, count=2)
    asyncio.run(agent_session(home, model, dataset))
