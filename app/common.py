"""What every tab shares: the studio context handed to each tab, the engine's queue slot, error handling.

No torch here (nor anything that imports it): the engine object is handed in, and the engine's exception classes
are looked up only when a job fails.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import traceback
from typing import Any, Callable

import gradio as gr

log = logging.getLogger("flux_studio")

# Every event that runs an engine job uses this queue slot: one job at a time, across all tabs, in arrival order.
ENGINE_QUEUE = {"concurrency_id": "engine", "concurrency_limit": 1}


@dataclasses.dataclass
class StudioContext:
    """Handed to each tab's ``build(ctx)``: the engine and what the studio knows about its setup."""

    engine: Any
    demo_only: bool = False
    models_dir: str = "models"
    outputs_dir: pathlib.Path = pathlib.Path("outputs")
    title: Any = None      # the studio's title bar (gr.HTML), for tabs that change what it shows (the VRAM limit)
    tab: Any = None        # the gr.Tab being built (its .select event: "the tab was opened")
    tabs: Any = None       # the studio's gr.Tabs (an event that opens another tab outputs gr.Tabs(selected=id))
    tab_ids: tuple = ()    # the ids of the tabs being built, in order (a tab offers "send to X" only when X exists)
    shared: dict = dataclasses.field(default_factory=dict)  # one dict for all tabs: components one tab hands another

    def title_html(self) -> str:
        """The title bar's current text (device, VRAM limit, folders): for a tab that changed one of them."""
        from app.studio import title_html  # noqa: PLC0415 - app.studio imports this module

        return title_html(self)

    @classmethod
    def for_engine(cls, engine: Any) -> "StudioContext":
        models_dir = getattr(engine, "models_dir", None) or "models"
        outputs_dir = pathlib.Path(getattr(engine, "outputs_dir", None) or "outputs")
        return cls(engine=engine, demo_only=bool(getattr(engine, "demo_only", False)),
                   models_dir=str(models_dir), outputs_dir=outputs_dir)


def _engine_exceptions() -> tuple[type, type]:
    """(EngineError, JobCancelled), imported only when needed: ``engine`` is already loaded by then."""
    try:
        from engine import EngineError, JobCancelled  # noqa: PLC0415
    except ImportError:  # the engine package lays them out in engine.errors
        from engine.errors import EngineError, JobCancelled  # noqa: PLC0415
    return EngineError, JobCancelled


def is_cancelled(exc: BaseException) -> bool:
    return isinstance(exc, _engine_exceptions()[1])


def user_error(message: str, title: str = "Error") -> gr.Error:
    """A gr.Error for a person, no traceback printed. The browser renders the message as HTML, so angle brackets
    are escaped (a path such as <models dir> stays visible); quotes and & stay readable for API clients."""
    text = str(message).replace("<", "&lt;").replace(">", "&gt;")
    return gr.Error(text, title=title, print_exception=False)


def call_engine(fn: Callable, *args: Any, title: str = "Could not run the job", **kwargs: Any) -> Any:
    """Run an engine call; its EngineError becomes a gr.Error with the engine's message (never a traceback).

    JobCancelled is re-raised for the caller to handle (it is normal, not an error). Any other exception is a bug:
    its traceback goes to the console and the person gets a short message; the studio stays usable.
    """
    engine_error, job_cancelled = _engine_exceptions()
    try:
        return fn(*args, **kwargs)
    except job_cancelled:
        raise
    except engine_error as exc:
        raise user_error(str(exc) or type(exc).__name__, title=title) from None
    except gr.Error:
        raise
    except Exception as exc:  # noqa: BLE001 - shown as a message, logged with its traceback
        log.error("unexpected error in %s:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
        raise user_error(
            f"Unexpected error ({type(exc).__name__}: {exc}). Details are in the console; the studio is still usable.",
            title=title,
        ) from None
