"""Running an engine job from a tab: progress into Gradio's bar, cancel, the engine's notes as toasts, results.

Every tab that makes images runs ``run_job`` in its button's event and shows the same outputs (images, the first
image's info, its seed, the full results). A job belongs to the browser session that started it: that session's
Cancel stops it, nobody else's does; and it stops when the web queue drops its event (the client cancelled it, the
tab was closed): the job handlers are wrapped in ``@engine_job``. No torch here.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Any, Callable, Optional

import anyio
import gradio as gr

from app.common import call_engine, is_cancelled
from app.recipe_text import result_info
from studio.jobs import Job

CANCELLING = "Cancelling: the job stops after its current step."
NOTHING_TO_CANCEL = "Cancelled: no job of yours was running; one waiting its turn will not run."
WATCH_EVERY_S = 0.2     # how often an event's liveness is checked (a closed tab stops its job within this + a step)

# The engine job of the event being handled: set by @engine_job, read by run_job in the worker thread (anyio copies
# the context into the thread, with Gradio's own variables that gr.Info and gr.Progress use).
_JOB: contextvars.ContextVar[Optional[Job]] = contextvars.ContextVar("flux_studio_job", default=None)


def _gradio_event() -> tuple[Optional[str], Any]:
    """(browser session, the queue's Event) of the event being handled; (None, None) outside one.

    Reads Gradio 6.31 internals (pinned): LocalContext holds the request and event id; the Event itself, whose
    ``alive`` turns False when the tab's stream closes (queue.clean_events), is only reachable in the queue's
    ``active_jobs``."""
    from gradio.context import LocalContext  # noqa: PLC0415

    session = getattr(LocalContext.request.get(None), "session_hash", None)
    event_id = LocalContext.event_id.get(None)
    queue = getattr(LocalContext.blocks.get(None), "_queue", None)
    batches = getattr(queue, "active_jobs", None) or []
    event = next((e for batch in batches if batch for e in batch if e._id == event_id), None)
    return session, event


async def _cancel_when_dropped(job: Job, event: Any) -> None:
    """Cancel ``job`` once the queue marks its event dead (its browser tab was closed)."""
    if event is None:
        return
    while event.alive:
        await asyncio.sleep(WATCH_EVERY_S)
    job.cancel()


def engine_job(fn: Callable) -> Callable:
    """Decorator for a tab's job handler (a sync function that calls ``run_job``): the job belongs to the event's
    browser session and stops when the queue drops the event. Gradio sees the same signature and docstring (its
    API page, gr.Progress and gr.Request injection) and an async function, so that cancelling the event's task
    reaches the handler: when Gradio itself runs a sync function in a thread, a cancel ends the task and leaves
    the thread, and the engine job, running."""

    @functools.wraps(fn)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        session, event = _gradio_event()
        job = Job(owner=session, asked_at=getattr(event, "enqueue_time", None))   # a Cancel since then stops it
        token = _JOB.set(job)
        watcher = asyncio.ensure_future(_cancel_when_dropped(job, event))
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            job.cancel()    # the thread runs on until the engine's next step, then saves nothing
            raise
        finally:
            watcher.cancel()
            _JOB.reset(token)

    return handler


def run_job(engine: Any, request: dict, progress: Any, title: str) -> tuple:
    """``engine.generate(request)`` with per-step progress, as a job of this browser session (the event's job under
    ``@engine_job``). Returns (gallery items, info text, first seed, results); a cancelled job returns no images and
    "Cancelled."; an engine error becomes a gr.Error titled ``title``."""
    job = _JOB.get() or Job(owner=_gradio_event()[0])
    progress(0, desc="Starting…")

    def on_progress(done: int, total: int, message: str) -> None:
        progress((int(done), int(total) if total else None), desc=message, unit="steps")

    try:
        made = call_engine(engine.generate, request, progress=on_progress, job=job, title=title)
    except Exception as exc:  # noqa: BLE001 - only JobCancelled gets here; others are gr.Error
        if is_cancelled(exc):
            gr.Info(str(exc) or "Cancelled.")
            return [], "Cancelled.", None, []
        raise
    if not made:
        return [], "", None, []
    for note in made[0].get("notes") or []:
        gr.Info(note)
    images = [(item["path"], f"seed {item['seed']}") for item in made]
    return images, result_info(made[0]), made[0]["seed"], made


def cancel_job(engine: Any, request: Any = None) -> None:
    """Cancel the jobs of the browser session of ``request`` (a gr.Request); another session's job runs on."""
    session = getattr(request, "session_hash", None)
    stopped = engine.cancel(owner=session) if session else 0    # no session: never owner=None, which is every job
    gr.Info(CANCELLING if stopped else NOTHING_TO_CANCEL)


def wire_cancel(button: Any, engine: Any, api_name: str) -> None:
    """A tab's Cancel button: stops this session's running job after its step; a job of the session still waiting
    behind someone else's will not run (the engine remembers the cancel). Queued, in a slot of its own, so that its
    message reaches the page (Gradio shows gr.Info only from queued events) and it never waits behind a job."""
    button.click(cancel_handler(engine), api_name=api_name, concurrency_id="cancel", concurrency_limit=None)


def cancel_handler(engine: Any) -> Callable:
    """A Cancel button's event function (no inputs, no outputs): cancels the jobs of the session that pressed it."""

    def cancel(request: gr.Request) -> None:
        """Stop your running job (this session's) after its current step; other people's jobs run on."""
        cancel_job(engine, request)

    return cancel


def busy() -> tuple:
    """(run button, cancel button) updates while a job runs."""
    return gr.update(visible=False), gr.update(visible=True)


def idle() -> tuple:
    return gr.update(visible=True), gr.update(visible=False)
