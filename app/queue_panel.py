"""The queue on the page: a side panel listing this browser's queued jobs (position, progress, ↑ ↓ ✕ each), the
"Add to queue" button of every image tab (Ctrl+Enter in a prompt presses it), and the finished jobs' images shown in
the gallery of the tab that queued them. The queue itself is the engine's (``studio.queue.JobQueue``).

Wiring, in three steps (no tab imports another, nor this panel's internals):

- ``build_queue_panel(ctx)`` before the tabs: the side panel, and ``ctx.shared["queue"]``;
- ``wire_queue(ctx, tab_id, button, request_for, inputs, show=...)`` in each tab's ``build``: ``request_for(*inputs)``
  is the request the tab's run button would run (the same function: one place says what a tab's job is); ``show``
  puts finished results in the tab's gallery;
- ``finish_queue_panel(ctx, demo)`` after the tabs: the timer that keeps the panel and the galleries current.

A browser keeps its owner id (``gr.BrowserState``), so a reloaded page still sees, moves and cancels its own jobs;
other people's jobs show only as a count ahead ("2 jobs ahead of yours"). The timer runs only while this browser has
jobs waiting or running. In a shared studio the same id names the visitor (``app.visitors.bind_page``): their part of
the outputs folder and their History.
"""
from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any, Callable, Optional

import gradio as gr

from app.common import call_engine
from app.visitors import bind_page
from studio.queue import CANCELLED, DONE, FAILED, RUNNING, WAITING, expand

QUEUE = "queue"
TICK_S = 1.0
OWNER = re.compile(r"^[0-9a-f]{32}$")
EMPTY = "Nothing queued. **Add to queue** (or Ctrl+Enter in a prompt) in any tab queues its job here."
# The panel's events are queued (a State changed by an unqueued event does not trigger its listeners in the page:
# the list's redraw, a tab's gallery), in a slot of their own that never waits behind an engine job.
PANEL_EVENT = {"concurrency_id": "queue-panel", "concurrency_limit": None, "show_progress": "hidden",
               "api_visibility": "private"}
STATE_MARKS = {RUNNING: "▶ running", WAITING: "#{position}", DONE: "✓ done", FAILED: "⚠ failed",
               CANCELLED: "✕ cancelled"}


@dataclasses.dataclass
class QueuePanel:
    sidebar: Any
    owner: Any               # gr.BrowserState: this browser's id (its jobs are its own)
    each_line: Any           # gr.Checkbox: one job per line of the prompt
    variations: Any          # gr.Slider: the same job with the next seeds
    snapshot: Any            # gr.State: what the list shows (JobQueue.snapshot, without the running job's steps)
    running: Any             # gr.Markdown: the running job's progress
    timer: Any               # gr.Timer
    clear: Any               # gr.Button: drop the finished jobs from the list
    deliveries: dict = dataclasses.field(default_factory=dict)   # tab id -> gr.State of results that arrived


def build_queue_panel(ctx: Any) -> QueuePanel:
    """The side panel (closed until something is queued); registered as ``ctx.shared["queue"]``."""
    with gr.Sidebar(label="Queue", open=False, position="right", width=360, elem_id="queue-panel") as sidebar:
        gr.Markdown("### Queue", elem_id="queue-title")
        each_line = gr.Checkbox(False, label="Each line of the prompt is a job", elem_id="queue-each-line")
        variations = gr.Slider(1, 16, value=1, step=1, label="Seed variations", elem_id="queue-variations",
                               info="each job again with the next seeds")
        running = gr.Markdown("", elem_id="queue-running")
        snapshot = gr.State({"items": [], "others": 0})

        @gr.render(inputs=[snapshot], triggers=[snapshot.change], queue=False, show_progress="hidden")
        def draw(snap):
            _draw_items(ctx, snap or {})

        clear = gr.Button("Clear finished", size="sm", elem_id="queue-clear")
    owner = gr.BrowserState(None, storage_key="flux_studio_queue_owner")
    timer = gr.Timer(TICK_S, active=False)
    panel = QueuePanel(sidebar=sidebar, owner=owner, each_line=each_line, variations=variations, snapshot=snapshot,
                       running=running, timer=timer, clear=clear)
    ctx.shared[QUEUE] = panel
    return panel


def _draw_items(ctx: Any, snap: dict) -> None:
    """The list: this browser's jobs (running, waiting in order, finished newest first), each with its buttons."""
    items = snap.get("items") or []
    if snap.get("others"):
        gr.Markdown(others_line(snap["others"], bool(items)), elem_id="queue-others")
    if not items:
        gr.Markdown(EMPTY, elem_id="queue-empty")
    for item in items:
        qid, state = item["id"], item["state"]
        mark = STATE_MARKS.get(state, state).format(position=item.get("position"))
        text = f"**{mark}** {item['summary']}"
        if state == DONE:
            count = len(item.get("images") or [])
            text += f"  \n{count} image{'s' if count != 1 else ''}: in the {item['tab'].capitalize()} tab and History"
        elif item.get("message"):
            text += f"  \n{item['message']}"
        with gr.Column(variant="panel", elem_id=f"queue-item-{qid}", elem_classes=["queue-item", f"queue-{state}"]):
            gr.Markdown(text, elem_classes=["queue-line"])
            if state in (WAITING, RUNNING):
                with gr.Row(elem_classes=["queue-buttons"]):
                    if state == WAITING:
                        up = gr.Button("↑", size="sm", min_width=40, elem_id=f"queue-up-{qid}")
                        down = gr.Button("↓", size="sm", min_width=40, elem_id=f"queue-down-{qid}")
                        _on(ctx, up, lambda owner, i=qid: ctx.engine.queue.move(i, owner, -1))
                        _on(ctx, down, lambda owner, i=qid: ctx.engine.queue.move(i, owner, 1))
                    stop = gr.Button("✕ Cancel", size="sm", variant="stop", min_width=70,
                                     elem_id=f"queue-cancel-{qid}")
                    _on(ctx, stop, lambda owner, i=qid: ctx.engine.queue.cancel(i, owner))


def others_line(others: int, mine: bool) -> str:
    """How many of other people's jobs run or wait before this browser's: "2 jobs ahead of yours"."""
    jobs = f"{others} job{'s' if others != 1 else ''}"
    return f"{jobs} ahead of yours (other people's)." if mine else f"{jobs} of other people in the queue."


def _on(ctx: Any, button: Any, act: Callable[[str], Any]) -> None:
    """A list button: do ``act(owner)``, then show the list as it is now."""
    panel: QueuePanel = ctx.shared[QUEUE]

    def click(owner):
        if valid_owner(owner):
            act(owner)
        return view(ctx.engine, owner)

    button.click(click, inputs=[panel.owner], outputs=[panel.snapshot, panel.running], **PANEL_EVENT)


def valid_owner(owner: Any) -> bool:
    return isinstance(owner, str) and bool(OWNER.match(owner))


def view(engine: Any, owner: Optional[str]) -> tuple[dict, str]:
    """(the list's snapshot without the running job's steps, the running line) for ``owner``."""
    snap = engine.queue.snapshot(owner)
    line = ""
    for item in snap["items"]:
        if item["state"] == RUNNING:
            done, total = item["steps"]
            line = f"Running {item['summary']}: step {done} of {total}" if total else f"Starting {item['summary']}…"
    items = [{k: v for k, v in item.items() if k != "steps"} for item in snap["items"]]
    return {"items": items, "others": snap["others"]}, line


def busy(snapshot: dict) -> bool:
    """Whether this browser has jobs that still wait or run (the timer runs while so)."""
    return any(item["state"] in (WAITING, RUNNING) for item in (snapshot or {}).get("items") or [])


# ------------------------------------------------------------------------------------------------- tabs
def wire_queue(ctx: Any, tab_id: str, button: Any, request_for: Callable[..., dict], inputs: list,
               show: Optional[tuple] = None, before: Optional[tuple] = None, check: Optional[tuple] = None) -> None:
    """``button`` queues the tab's job: ``request_for(*inputs)`` expanded by the panel's options (prompt lines, seed
    variations). ``before`` = (fn, inputs, outputs) runs first, on the page's side (Generate writes its LoRA list);
    ``check`` = (validator, inputs): a missing input said at its field, and nothing queued (as the run button does);
    ``show`` = (fn, inputs, outputs): ``fn(results, *inputs)`` shows finished results in the tab."""
    panel: Optional[QueuePanel] = ctx.shared.get(QUEUE)
    if panel is None:          # a studio built without the panel (a test of one tab)
        button.visible = False
        return

    def add(owner, each_line, variations, *values):
        # What is wrong is said in a message (no "Error" badge on the panel, which may be closed).
        if not valid_owner(owner):
            gr.Warning("The page is still starting: try again in a moment.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            request = call_engine(request_for, *values, title="Could not queue")
            jobs = call_engine(expand, request, bool(each_line), variations, title="Could not queue")
            ids = call_engine(ctx.engine.queue.add, jobs, owner, tab_id, title="Could not queue")
        except gr.Error as exc:
            gr.Warning(f"Not queued: {exc.message}")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        snap, line = view(ctx.engine, owner)
        positions = [item.get("position") for item in snap["items"] if item["id"] in ids and item.get("position")]
        where = (f" (position {positions[0]}" + (f"–{positions[-1]}" if len(positions) > 1 else "") + ")"
                 if positions else " (running now)")
        gr.Info(f"Queued {len(ids)} job{'s' if len(ids) != 1 else ''}{where}. The Queue panel lists them.")
        return snap, line, gr.Timer(active=True), gr.Sidebar(open=True)

    outputs = [panel.snapshot, panel.running, panel.timer, panel.sidebar]
    event = dict(inputs=[panel.owner, panel.each_line, panel.variations, *inputs], outputs=outputs,
                 concurrency_id="queue-add", concurrency_limit=None, show_progress="hidden",
                 api_visibility="private")
    steps = []
    if before is not None:
        fn, before_inputs, before_outputs = before
        steps.append(dict(fn=fn, inputs=before_inputs, outputs=before_outputs, queue=False, api_visibility="private"))
    if check is not None:
        validator, check_inputs = check
        # A validator runs only on a queued event, before its function (which has nothing left to do).
        steps.append(dict(fn=lambda *_: None, inputs=check_inputs, outputs=None, validator=validator,
                          show_progress="hidden", api_visibility="private"))
    chain = None
    for step in steps:
        chain = button.click(**step) if chain is None else chain.then(**step)
    if chain is None:
        button.click(add, **event)
    else:
        chain.success(add, **event)
    if show is not None:
        arrived = gr.State([])
        fn, show_inputs, show_outputs = show
        arrived.change(fn, inputs=[arrived, *show_inputs], outputs=show_outputs, queue=False,
                       show_progress="hidden", api_visibility="private")
        panel.deliveries[tab_id] = arrived


def finish_queue_panel(ctx: Any, demo: Any) -> None:
    """After the tabs: the page's owner id on load, the timer (list, progress line, finished results to the tabs)."""
    panel: Optional[QueuePanel] = ctx.shared.get(QUEUE)
    if panel is None:
        return
    engine = ctx.engine
    tabs = list(panel.deliveries)

    def on_load(owner, request: gr.Request):
        owner = owner if valid_owner(owner) else uuid.uuid4().hex
        bind_page(engine, request, owner)       # a shared studio: this page is this browser's visitor
        snap, line = view(engine, owner)
        return owner, snap, line, gr.Timer(active=busy(snap) or bool(engine.queue.pending_results(owner)))

    demo.load(on_load, inputs=[panel.owner], outputs=[panel.owner, panel.snapshot, panel.running, panel.timer],
              **PANEL_EVENT)

    def tick(owner):
        if not valid_owner(owner):
            return gr.skip(), gr.skip(), gr.Timer(active=False), *[gr.skip()] * len(tabs)
        arrived = engine.queue.take_results(owner)
        snap, line = view(engine, owner)
        return (snap, line, gr.Timer(active=busy(snap)),
                *[arrived[tab] if arrived.get(tab) else gr.skip() for tab in tabs])

    panel.timer.tick(tick, inputs=[panel.owner],
                     outputs=[panel.snapshot, panel.running, panel.timer, *[panel.deliveries[t] for t in tabs]],
                     **PANEL_EVENT)

    def clear(owner):
        if valid_owner(owner):
            engine.queue.clear_finished(owner)
        return view(engine, owner)

    panel.clear.click(clear, inputs=[panel.owner], outputs=[panel.snapshot, panel.running], **PANEL_EVENT)
