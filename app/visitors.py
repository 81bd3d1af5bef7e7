"""The web side of a shared studio (``studio.sharing``): who is asking, and the outputs folder kept out of reach.

- ``install(engine)``: the engine learns who asks from the event being handled (Gradio's request: its login name,
  its session, which the page binds to its browser's id when it loads: ``bind_page``).
- ``file_guard(engine)``: in a shared studio Gradio's file route serves nothing from the outputs folder by its path.
  The page never needs that: every image it shows is a copy in Gradio's cache under a name made from its content.
  Without the guard, a visitor who knew (or guessed) another's file name (``outputs/alice/2026-12-06/00001-7.png``)
  could open it, since the outputs folder is among the paths Gradio may serve (``launch_options``).

A studio that is not shared gets neither (``file_guard`` returns no middleware; ``identify`` is never asked).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Optional

from starlette.middleware import Middleware

FILE_ROUTES = ("/file=", "/file/")
REFUSED = b"File not allowed."


def who_is_asking() -> tuple[Optional[str], Optional[str]]:
    """(login name, session) of the Gradio event being handled; (None, None) outside one (the queue's worker)."""
    from gradio.context import LocalContext  # noqa: PLC0415

    request = LocalContext.request.get(None)
    return getattr(request, "username", None), getattr(request, "session_hash", None)


def install(engine: Any) -> None:
    """Let ``engine.sharing`` ask the handled event who is asking (a no-op for an engine without sharing)."""
    sharing = getattr(engine, "sharing", None)
    if sharing is not None and sharing.shared:
        sharing.identify = lambda: sharing.viewer_for(*who_is_asking())


def bind_page(engine: Any, request: Any, browser_id: Optional[str]) -> None:
    """The page of ``request`` (its session) belongs to the browser ``browser_id`` (the queue panel's id)."""
    sharing = getattr(engine, "sharing", None)
    if sharing is not None and sharing.shared:
        sharing.bind(getattr(request, "session_hash", None), browser_id)


def limits_line(engine: Any) -> str:
    """"This studio allows up to 1 MP, 30 steps, 2 images per job." ("" without limits)."""
    sharing = getattr(engine, "sharing", None)
    return sharing.describe() if sharing is not None else ""


def apply_limits(demo: Any, engine: Any) -> None:
    """Before launch: each tab's limits line (beside its run button, ``#<tab>-limits``) says the limits, and the
    Steps, Images and Edit's megapixels sliders (``#<tab>-steps``, ``-num-images``, ``-megapixels``) end at them
    (the width and height sliders stay: a long side is fine when the area is not). Nothing without limits."""
    sharing = getattr(engine, "sharing", None)
    limits = getattr(sharing, "limits", None)
    line = limits_line(engine)
    if not line:
        return
    caps = {"-steps": limits.max_steps, "-num-images": limits.max_batch,
            "-megapixels": None if limits.max_pixels is None else max(0.01, limits.max_pixels * 100 // 2 ** 20 / 100)}
    for block in getattr(demo, "blocks", {}).values():
        elem_id = str(getattr(block, "elem_id", None) or "")
        if elem_id.endswith("-limits"):
            block.value, block.visible = line, True
            continue
        for suffix, cap in caps.items():
            if cap is not None and elem_id.endswith(suffix) and isinstance(getattr(block, "maximum", None),
                                                                            (int, float)):
                block.maximum = min(block.maximum, cap)
                if isinstance(block.value, (int, float)) and block.value > block.maximum:
                    block.value = block.maximum


def requested_file(path: str) -> list[pathlib.Path]:
    """The local files a request path names through Gradio's file routes (each place one could begin)."""
    found = []
    for route in FILE_ROUTES:
        start = path.find(route)
        while start != -1:
            name = path[start + len(route):]
            if name and "://" not in name:
                try:
                    found.append(pathlib.Path(os.path.realpath(os.path.abspath(name))))
                except (OSError, ValueError):
                    pass
            start = path.find(route, start + 1)
    return found


class OutputsGuard:
    """Pure-ASGI middleware: 403 for a file route naming a file inside ``folder``."""

    def __init__(self, app: Any, folder: Callable[[], pathlib.Path]):
        self.app = app
        self.folder = folder

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") == "http" and self.refused(scope.get("path") or ""):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": REFUSED})
            return
        await self.app(scope, receive, send)

    def refused(self, path: str) -> bool:
        if not any(route in path for route in FILE_ROUTES):
            return False
        root = self.folder()
        return any(p == root or p.is_relative_to(root) for p in requested_file(path))


def file_guard(engine: Any) -> list:
    """The middleware for a shared studio (``[]`` for one that is not)."""
    sharing = getattr(engine, "sharing", None)
    if sharing is None or not sharing.shared:
        return []
    outputs = pathlib.Path(os.path.realpath(getattr(engine, "outputs_dir", None) or "outputs"))
    return [Middleware(OutputsGuard, folder=lambda: outputs)]
