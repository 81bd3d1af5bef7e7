"""The studio as an MCP server (``launch.py --mcp``, app.mcp_tools), driven by the ``mcp`` package's client over
streamable HTTP: the tools listed (only the studio's three, typed and described), a generate and an edit on the demo
models (the image comes back and is saved in the outputs folder), a bad argument refused with a clear message.

The studio is started in-process through ``launch_studio(..., mcp=True)``, as launch.py starts it, on the session
studio's engine (tests.test_app_client.running_studio).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import socket

import pytest
from PIL import Image

from studio import recipes as R

DEMO = "FLUX.1-dev-random-demo"
KONTEXT_DEMO = "FLUX.1-Kontext-dev-random-demo"
TOOLS = {"generate_image", "edit_image", "list_models"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(studio):
    """The studio with MCP on, as ``launch.py --mcp`` starts it, on the session studio's engine (its demo models are
    written and loaded already: one engine serving two pages, as a studio serves its tabs and its MCP tools)."""
    from app.mcp_tools import mcp_url
    from app.studio import launch_studio

    demo = launch_studio(studio.engine, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True,
                         mcp=True)
    try:
        yield type("Server", (), {"url": mcp_url(demo), "outputs": studio.outputs, "demo": demo})
    finally:
        demo.close()


def _session(url: str, work):
    """Run ``await work(session)`` in a fresh MCP client session on ``url``; returns its result."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def main():
        async with streamable_http_client(url) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    # In a thread of its own: in the suite this worker's main thread may already run an event loop (Playwright's
    # sync API holds one while the session's browser is open), where asyncio.run is refused.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _call(server, tool: str, **arguments):
    return _session(server.url, lambda session: session.call_tool(tool, arguments))


def _image_of(result) -> Image.Image:
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1, result.content
    assert images[0].mimeType == "image/png"
    image = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    image.load()
    return image


def _text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def _pngs(folder):
    return {p for p in folder.rglob("*.png") if ".work" not in p.parts and ".ref" not in p.name}


def test_only_the_studio_tools_are_served_typed_and_described(server):
    tools = {t.name: t for t in _session(server.url, lambda s: s.list_tools()).tools}
    assert set(tools) == TOOLS          # not the page's own events (/generate, /edit, /cancel, ...)
    endpoints = server.demo.get_api_info()["named_endpoints"]
    assert {"/generate", "/edit", "/cancel"} <= set(endpoints)      # which stay in the page's API for its clients
    gen = tools["generate_image"].inputSchema
    assert gen["required"] == ["prompt"]
    props = gen["properties"]
    assert [props[k]["type"] for k in ("prompt", "width", "height", "steps", "seed", "guidance", "model",
                                       "negative_prompt", "cfg_scale")] == \
        ["string", "integer", "integer", "integer", "integer", "number", "string", "string", "number"]
    assert props["width"]["default"] == 1024 and props["seed"]["default"] == -1
    assert all(prop.get("description") for prop in props.values()), props
    assert "64..4096" in props["width"]["description"]
    assert DEMO in props["model"]["description"] and props["model"]["default"] == DEMO
    assert "Returns" in tools["generate_image"].description
    edit = tools["edit_image"].inputSchema
    assert set(edit["required"]) == {"image", "instruction"}
    assert edit["properties"]["image"]["type"] == "string"          # a URL or a data: URL
    assert KONTEXT_DEMO in edit["properties"]["model"]["description"]
    assert all(prop.get("description") for prop in edit["properties"].values())


def test_list_models_names_what_the_tools_take(server):
    models = json.loads(_text_of(_call(server, "list_models")))
    assert models["default_generate"] == DEMO
    assert DEMO in [m["name"] for m in models["generate"]]
    assert KONTEXT_DEMO in [m["name"] for m in models["edit"]]
    assert KONTEXT_DEMO not in [m["name"] for m in models["generate"]]     # editing models edit only
    assert all(m["demo"] for m in models["generate"] if m["name"] == DEMO)


def test_generate_returns_the_image_and_saves_it(server):
    before = _pngs(server.outputs)
    result = _call(server, "generate_image", prompt="a red cube on a table", width=96, height=64, steps=2,
                   seed=4321)
    assert not result.isError, _text_of(result)
    assert _image_of(result).size == (96, 64)
    new = _pngs(server.outputs) - before
    assert len(new) == 1
    assert next(iter(new)).name in _text_of(result)        # "Image URL: ...": it names the saved file
    recipe = R.read_recipe(next(iter(new)))
    assert (recipe["seed"], recipe["width"], recipe["height"], recipe["num_inference_steps"]) == (4321, 96, 64, 2)
    assert recipe["variant"] == DEMO and recipe["prompt"] == "a red cube on a table"


def test_bad_arguments_are_refused_by_name(server):
    before = _pngs(server.outputs)
    result = _call(server, "generate_image", prompt="x", width=10, height=64, steps=2)
    assert result.isError
    assert "width 10" in _text_of(result) and "64..4096" in _text_of(result)
    result = _call(server, "generate_image", prompt="x", width=64, height=64, steps=500)
    assert result.isError and "Steps must be between 1 and 200, got 500" in _text_of(result)
    result = _call(server, "generate_image", prompt="x", width=64, height=64, model="FLUX.9")
    assert result.isError and "FLUX.9" in _text_of(result) and DEMO in _text_of(result)
    result = _call(server, "generate", prompt="x")                 # a page event is no tool
    assert result.isError and "Unknown tool" in _text_of(result)
    assert _pngs(server.outputs) == before


def test_edit_takes_an_image_and_saves_the_result(server):
    picture = Image.new("RGB", (320, 200), (40, 90, 200))
    picture.paste((250, 200, 0), (40, 40, 140, 160))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    before = _pngs(server.outputs)
    result = _call(server, "edit_image", image=data_url, instruction="make the square red", width=96, height=64,
                   steps=2, seed=11, model=KONTEXT_DEMO)
    assert not result.isError, _text_of(result)
    assert _image_of(result).size == (96, 64)
    new = _pngs(server.outputs) - before
    assert len(new) == 1
    recipe = R.read_recipe(next(iter(new)))
    assert recipe["variant"] == KONTEXT_DEMO and recipe["prompt"] == "make the square red" and recipe["seed"] == 11
    result = _call(server, "edit_image", image=data_url, instruction="x", model=DEMO, steps=2)
    assert result.isError and "not one edit_image takes" in _text_of(result)
    result = _call(server, "edit_image", image=data_url, instruction="x", width=10, height=64)
    assert result.isError and "width 10 is outside 64..4096" in _text_of(result)


def test_an_mcp_gradio_cannot_use_is_named_with_the_fix(monkeypatch):
    import importlib.metadata

    from app import mcp_tools

    assert mcp_tools.mcp_problem() is None           # the installed one works (the tests above ran on it)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.3.0")
    with pytest.raises(RuntimeError, match=r"mcp 2\.3\.0 is installed.*pip install \"mcp>=1\.21,<2\""):
        mcp_tools.add_tools(None, None)


def test_launch_has_the_mcp_flag(capsys):
    import launch

    assert launch.build_parser().parse_args(["--mcp"]).mcp is True
    assert launch.build_parser().parse_args([]).mcp is False
    with pytest.raises(SystemExit):       # Gradio's MCP server cannot log in: refused before anything starts
        launch.main(["--mcp", "--auth", "alice:pw"])
    assert "--mcp cannot be used with --auth" in capsys.readouterr().err
