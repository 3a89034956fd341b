"""A start image for API-only users (issue 19): uploaded over HTTP (/upload_image) as base64 or a data
URL, kept among the caller's uploads and named by 'image:NAME' for /generate; another user's reference
is not found; MCP's generate takes a reference or the image itself and refuses other kinds."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from mcp.server.mcpserver.exceptions import ToolError

from tests.conftest import free_port
from tests.family_support import start_image
from tests.ui_support import PASSWORDS

GIF = "data:image/gif;base64," + base64.b64encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").decode()


def data_url(file: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode()


@pytest.fixture()
def users_api(tmp_path: Path):
    """The studio's API with login on: alice and bob (queue not started: a generation is only queued)."""
    from studio.api import StudioApi
    from studio.auth import UsersFile
    from studio.context import StudioContext
    from studio.settings import StudioSettings

    users = UsersFile(tmp_path / "users.toml")
    for name in ("alice", "bob"):
        users.add(name, PASSWORDS[name])
    ctx = StudioContext.create(StudioSettings(home=tmp_path / "home", auth_file=users.path).validate(), start=False)
    yield StudioApi(ctx)
    ctx.inference.shutdown(force=True)  # the generations queued here are not to be drawn: no worker start
    ctx.close()


# About 10 s on a quiet 2-core machine (Gradio's start-up).
def test_an_api_only_user_uploads_a_start_image_and_generates_from_it(tmp_path: Path, users_api) -> None:
    from studio.http_api import register_api

    image = start_image(tmp_path / "start.png")
    with gr.Blocks() as demo:
        register_api(users_api)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, auth=users_api.ctx.accounts.users_file.check)
    try:
        url = f"http://127.0.0.1:{port}/"
        alice = Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False)
        reference = alice.predict(data_url(image), "my start", api_name="/upload_image")["image"]
        assert reference.startswith("image:my") and reference.endswith(".png"), reference
        owner = users_api.user("alice")
        assert users_api.start_image(owner, reference).read_bytes() == image.read_bytes()
        started = alice.predict("a green square", "demo", [], "", 32, 32, 5, 2, None, None, 7, 8, 1, False,
                                reference, api_name="/generate")
        queued = users_api.ctx.inference.status(started["request_id"])["request"]
        assert queued["image"] == str(users_api.start_image(owner, reference))
        shown = alice.predict(started["request_id"], api_name="/generation_status")["request"]
        assert shown["image"] == reference  # as /generate takes it again, not the server's path
        compared = alice.predict("a green square", seeds=[1, 2], width=32, height=32, num_frames=5, steps=2,
                                 image=reference, api_name="/compare")  # every cell from the same start image
        assert {users_api.ctx.inference.status(c["request_id"])["request"]["image"]
                for c in compared["cells"]} == {queued["image"]} and len(compared["cells"]) == 2
        with pytest.raises(Exception, match="png, jpg or webp"):
            alice.predict(GIF, "anim", api_name="/upload_image")
        bob = Client(url, auth=("bob", PASSWORDS["bob"]), verbose=False)
        with pytest.raises(Exception, match="no such uploaded image"):
            bob.predict("x", "demo", [], "", 32, 32, 5, 2, None, None, 7, 8, 1, False, reference,
                        api_name="/generate")
    finally:
        demo.close()


def test_mcp_generate_takes_a_start_image_and_refuses_other_kinds(tmp_path: Path, users_api) -> None:
    from studio.mcp_server import build_server

    alice = users_api.user("alice")
    server = build_server(users_api, alice)
    image = start_image(tmp_path / "start.png")

    async def session() -> None:
        tools = {t.name: t for t in await server.list_tools()}
        assert "image" in tools["generate"].input_schema["properties"]
        with pytest.raises(ToolError, match="png, jpg or webp"):
            await server.call_tool("generate", {"prompt": "x", "image": GIF})
        with pytest.raises(ToolError, match="png, jpg or webp"):
            await server.call_tool("generate", {"prompt": "x", "image": "not base64 at all!"})
        await server.call_tool("generate", {"prompt": "a green square", "image": data_url(image)})

    asyncio.run(session())
    with pytest.raises(ValueError, match="at most 20 MB"):  # refused before decoding
        users_api.upload_image_data(alice, "iVBORw0K" * (4 * 2**20))
    assert len(users_api.list_generations(alice, 50, 0)) == 1  # the refused ones queued nothing
    stored = list((users_api.user_uploads(alice) / "images").glob("*.png"))
    assert [f.read_bytes() for f in stored] == [image.read_bytes()]
    with pytest.raises(FileNotFoundError):  # bob cannot name alice's upload
        users_api.start_image(users_api.user("bob"), f"image:{stored[0].name}")
