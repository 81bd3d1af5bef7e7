"""The studio: a title bar, the demo banner, one tab per module in ``TABS``, the queue.

Adding a tab = writing ``tabs/<name>.py`` (with ``TITLE`` and ``build(ctx)``) and adding one line to ``TABS``.

Nothing here contacts an outside host: the theme uses system fonts only (no Google Fonts), analytics are off,
and only ``share=True`` opens a tunnel.
"""
from __future__ import annotations

import dataclasses
import html
import importlib
import os
import pathlib
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from app.common import ENGINE_QUEUE, StudioContext  # noqa: E402
from app.http_guard import guard_middleware  # noqa: E402
from app.queue_panel import build_queue_panel, finish_queue_panel  # noqa: E402
from app.visitors import apply_limits, file_guard, install as install_visitors  # noqa: E402

# One line per tab, in display order. Each module has TITLE (the tab's label) and build(ctx: StudioContext).
TABS = [
    "tabs.generate",
    "tabs.edit",
    "tabs.inpaint",
    "tabs.eligen",
    "tabs.train",
    "tabs.settings",
    "tabs.history",     # last: it restores into and sends to the tabs above (app.send_to)
]

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
CSS_PATH = ASSETS / "studio.css"
# Gradio keeps a copy of every output and upload in its cache. Every 10 minutes, drop copies older than 6 hours:
# images are saved in the outputs folder anyway, so the cache only feeds open pages, and 6 hours covers a long session
# working on one upload. Gradio also empties the cache when the studio stops.
DELETE_CACHE = (10 * 60, 6 * 3600)
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
                "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]


def studio_theme() -> gr.themes.Base:
    """A local-only theme: system fonts (plain names, so no stylesheet is fetched from anywhere)."""
    return gr.themes.Default(
        primary_hue="indigo",
        secondary_hue="slate",
        neutral_hue="slate",
        radius_size="md",
        font=SYSTEM_FONTS,
        font_mono=MONO_FONTS,
    )


def studio_css() -> str:
    return CSS_PATH.read_text(encoding="utf-8") if CSS_PATH.is_file() else ""


def _format_gb(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def title_html(ctx: StudioContext) -> str:
    extra = []
    device = getattr(ctx.engine, "device", None)
    if device:
        extra.append(f"device {html.escape(str(device))}")
    vram = getattr(ctx.engine, "vram_limit", None)
    if vram:
        extra.append(f"VRAM limit {html.escape(_format_gb(vram))} GB")
    extra.append(f"models: {html.escape(ctx.models_dir)}")
    extra.append(f"outputs: {html.escape(str(ctx.outputs_dir))}")
    return (
        "<div class='studio-title'><span class='studio-name'>FLUX Studio</span>"
        "<span class='studio-sub'>local studio for the FLUX models</span>"
        f"<span class='studio-meta'>{' · '.join(extra)}</span></div>"
    )


def demo_banner_html(ctx: StudioContext) -> str:
    return (
        "<div class='demo-banner' role='alert'><strong>Random-weight demo model:</strong> images are noise. "
        f"Put real weights in <code>{html.escape(ctx.models_dir)}</code> "
        "(see README) and restart to generate real images.</div>"
    )


def load_tabs(names: list[str] | None = None) -> list[Any]:
    return [importlib.import_module(name) for name in (names or TABS)]


def build_studio(engine: Any, tabs: list[str] | None = None) -> gr.Blocks:
    """The whole studio as one gr.Blocks (queue set up: one engine job at a time). Launch with ``launch_studio``
    (or pass ``launch_options(engine)`` to ``.launch()``) to get the theme, CSS and file access."""
    ctx = StudioContext.for_engine(engine)
    # As many tab jobs at once as the engine runs (Ray Serve replicas: studio.serving; else one), set before the
    # tabs are built: their engine events share this slot.
    ENGINE_QUEUE["concurrency_limit"] = getattr(getattr(engine, "executor", None), "slots", 1)
    install_visitors(engine)           # a shared studio: who asks, from each event (app.visitors)
    files = getattr(engine, "files", None)
    if files is not None:              # requests may name the files people upload through the page
        from gradio.utils import get_upload_folder  # noqa: PLC0415

        files.allow(get_upload_folder(), "uploads")
    with gr.Blocks(title="FLUX Studio", analytics_enabled=False, fill_width=True, delete_cache=DELETE_CACHE) as demo:
        ctx.title = gr.HTML(title_html(ctx), elem_id="studio-title", js_on_load=None)
        if ctx.demo_only:
            gr.HTML(demo_banner_html(ctx), elem_id="demo-banner", js_on_load=None)
        build_queue_panel(ctx)          # the side panel; each tab's "Add to queue" feeds it (app.queue_panel)
        modules = load_tabs(tabs)
        ctx.tab_ids = tuple(getattr(m, "TAB_ID", m.__name__.rsplit(".", 1)[-1]) for m in modules)
        # Wrap rather than hide tabs behind "⋯" on narrow screens (phones).
        with gr.Tabs(elem_id="studio-tabs", overflow_behavior="wrap") as ctx.tabs:
            for module in modules:
                tab_id = getattr(module, "TAB_ID", module.__name__.rsplit(".", 1)[-1])
                with gr.Tab(module.TITLE, id=tab_id, elem_id=f"tab-{tab_id}") as tab:
                    module.build(dataclasses.replace(ctx, tab=tab))
        finish_queue_panel(ctx, demo)
    apply_limits(demo, engine)         # a shared studio's limits, said beside each run button (app.visitors)
    # One engine job at a time (engine events share ENGINE_QUEUE's slot); everything else is instant.
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch_options(engine: Any) -> dict:
    """Keyword arguments for ``Blocks.launch``: theme, CSS, and read access to the outputs folder."""
    outputs = pathlib.Path(getattr(engine, "outputs_dir", None) or "outputs").resolve()
    return {
        "theme": studio_theme(),
        "css": studio_css(),
        "js": (ASSETS / "shortcuts.js").read_text(encoding="utf-8"),     # Ctrl+Enter runs the tab's job
        "allowed_paths": [str(outputs)],
        "favicon_path": str(ASSETS / "favicon.png") if (ASSETS / "favicon.png").is_file() else None,
    }


def launch_studio(engine: Any, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
                  auth: Any = None, prevent_thread_lock: bool = False, quiet: bool = False,
                  inbrowser: bool = False, allowed_hosts: Any = (), mcp: bool = False,
                  tabs: list[str] | None = None) -> gr.Blocks:
    """Build and serve the studio; returns the running Blocks (``.local_url`` is its address). Only requests for
    ``host``, loopback names, the --share link and ``allowed_hosts`` are answered; failed logins are slowed.
    ``mcp``: also an MCP server of the generate / edit tools (``app.mcp_tools``; its address: ``mcp_url``).
    ``tabs``: the tab modules (default ``TABS``)."""
    demo = build_studio(engine, tabs)
    if mcp:
        from app import mcp_tools  # noqa: PLC0415

        mcp_tools.add_tools(demo, engine)
    bound = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"   # where Gradio will listen
    guard = guard_middleware(bound, allowed_hosts or (), share_url=lambda: demo.share_url)
    demo.launch(
        app_kwargs={"middleware": [guard, *file_guard(engine)]},
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        auth_message="FLUX Studio" if auth else None,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        inbrowser=inbrowser,
        show_error=True,
        footer_links=["api", "settings"],
        mcp_server=bool(mcp),
        ssr_mode=False,
        **launch_options(engine),
    )
    if mcp:
        mcp_tools.only_studio_tools(demo)     # the page's own events are not MCP tools
    prepare = getattr(engine, "prepare_in_background", None)   # what a fast start left for later (the demo's files)
    if callable(prepare):
        prepare()
    return demo
