"""Running an engine job from a tab: progress into Gradio's bar, cancel, the engine's notes as toasts, results.

Every tab that makes images runs ``run_job`` in its button's event and shows the same outputs (images, the first
image's info, its seed, the full results). A job belongs to the browser session that started it: that session's
Cancel stops it, nobody else's does; and it stops when the web queue drops its event (the client cancelled it, the
tab was closed): the job handlers are wrapped in ``@engine_job``. A handler that shows the image as it denoises is a
generator over ``stream_job`` (the same outputs and the latest preview's file, for a ``gr.State`` whose change shows
it: a State is no part of the API, so the endpoint's outputs stay as they were). No torch here.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import queue
import threading
from typing import Any, Callable, Iterator, Optional

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
    the thread, and the engine job, running. A generator function (one that streams previews) stays a generator."""
    if inspect.isgeneratorfunction(fn):
        return _streaming_job(fn)

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


def _streaming_job(fn: Callable) -> Callable:
    """``engine_job`` for a generator function: it runs in one worker thread (as the job's, with the event's
    context) and its items are handed to Gradio as they come; a dropped event or a cancelled task cancels the job."""

    @functools.wraps(fn)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        session, event = _gradio_event()
        job = Job(owner=session, asked_at=getattr(event, "enqueue_time", None))
        watcher = asyncio.ensure_future(_cancel_when_dropped(job, event))
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            _JOB.set(job)        # in this thread's copy of the event's context, where run_job reads it
            try:
                for item in fn(*args, **kwargs):
                    loop.call_soon_threadsafe(items.put_nowait, (True, item))
                loop.call_soon_threadsafe(items.put_nowait, (False, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the event, which shows gr.Error as a message
                loop.call_soon_threadsafe(items.put_nowait, (False, exc))

        # Kept referenced while it runs (asyncio holds tasks weakly).
        worker = asyncio.ensure_future(anyio.to_thread.run_sync(produce, abandon_on_cancel=True))  # noqa: F841
        try:
            while True:
                more, item = await items.get()
                if not more:
                    if item is not None:
                        raise item
                    return
                yield item
        except BaseException:
            job.cancel()         # the thread runs on until the engine's next step, then saves nothing
            raise
        finally:
            watcher.cancel()

    return handler


_END = object()


def stream_job(engine: Any, request: dict, progress: Any, title: str, previews: bool = True) -> Iterator[tuple]:
    """``run_job`` showing the image as it denoises: yields (gr.update() x 4, preview file) for each preview (the
    newest when several wait), then run_job's four outputs and None (no preview: the tab hides it). For a generator
    handler under ``@engine_job``; ``previews`` False runs the job without them."""
    if not previews:
        yield (*run_job(engine, request, progress, title), None)
        return
    sent: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["value"] = run_job(engine, request, progress, title, preview=sent.put)
        except BaseException as exc:  # noqa: BLE001 - raised again in the handler's thread
            outcome["error"] = exc
        finally:
            sent.put(_END)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True,
                              name="flux-studio-job")
    thread.start()
    while True:
        path = sent.get()
        while path is not _END and not sent.empty():
            path = sent.get()                      # Gradio was slower than the job: only the newest is shown
        if path is _END:
            break
        yield (gr.update(), gr.update(), gr.update(), gr.update(), path)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield (*outcome["value"], None)


def run_job(engine: Any, request: dict, progress: Any, title: str,
            preview: Optional[Callable[[str], None]] = None) -> tuple:
    """``engine.generate(request)`` with per-step progress, as a job of this browser session (the event's job under
    ``@engine_job``); ``preview(file)`` gets a picture of the image every few steps. Returns (gallery items, info
    text, first seed, results); a cancelled job returns no images and "Cancelled."; an engine error becomes a
    gr.Error titled ``title``."""
    job = _JOB.get() or Job(owner=_gradio_event()[0])
    progress(0, desc="Starting…")

    def on_progress(done: int, total: int, message: str) -> None:
        progress((int(done), int(total) if total else None), desc=message, unit="steps")

    try:
        extra = {"preview": preview} if preview is not None else {}
        made = call_engine(engine.generate, request, progress=on_progress, job=job, title=title, **extra)
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
