"""The studio's job queue: image jobs waiting in order, each with its position, movable and cancellable one by one.

A tab's "Queue" button (or Ctrl+Enter in its prompt) adds its request here instead of running it while the person
watches; a prompt list (one job per line) and seed variations (the same job with the next seeds) add several at once.
One worker thread runs the queue through ``Engine.generate``, in order, sharing the engine's one job slot with the
jobs people run straight from a tab. Finished jobs stay listed for a while; their images are saved like any other
(History shows them) and handed once to the page of their owner (``take_results``), which shows them in the tab the
job came from.

Items belong to an owner (the studio passes an id the browser keeps, so a reload still owns its jobs): an owner sees,
moves and cancels only its own items; of other people's it sees only how many run or wait ahead. Requests are
checked when they are queued (``validate``), so a mistake is said at once, not minutes later. In a shared studio an
item also records who queued it (``who``: the person, as ``studio.sharing`` names them), and runs as them: its images
go to their part of the outputs folder.

No torch and no gradio here: the engine's ``generate`` and ``validate`` are handed in.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from engine.errors import EngineError, JobCancelled

from .jobs import Job

log = logging.getLogger("flux_studio")

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"
MAX_WAITING = 200          # waiting items, all owners together (a shared link must not fill memory)
MAX_ADD = 64               # jobs one press may add (a prompt list times its seed variations)
KEEP_FINISHED = 50         # finished items kept listed, all owners together (the oldest go first)
SUMMARY_CHARS = 60

Run = Callable[..., list]            # Engine.generate(request, progress=..., job=...)
Validate = Callable[[dict], Any]     # Engine.validate(request): raises EngineError when the request is wrong


@dataclasses.dataclass
class QueueItem:
    """One queued job: its request, whose it is, which tab shows its images, and how it went."""

    id: str
    owner: Optional[str]
    tab: str
    request: dict
    summary: str
    job: Job
    viewer: Optional[str] = None   # who queued it in a shared studio (its images go to their folder)
    state: str = WAITING
    steps: tuple = (0, 0)          # (done, total) of the running job
    results: list = dataclasses.field(default_factory=list)
    message: str = ""              # why it failed, or how it was cancelled
    delivered: bool = False        # its results were handed to its owner's page


def summary(request: dict) -> str:
    """A queued job in one line: the start of its prompt, the model, the size and the seed."""
    prompt = " ".join(str(request.get("prompt") or "").split()) or "(no prompt)"
    if len(prompt) > SUMMARY_CHARS:
        prompt = prompt[:SUMMARY_CHARS - 1] + "…"
    parts = [f"“{prompt}”"]
    if request.get("variant"):
        parts.append(str(request["variant"]))
    if request.get("width") and request.get("height"):
        parts.append(f"{request['width']}×{request['height']}")
    seed = request.get("seed", -1)
    parts.append("random seed" if seed in (None, -1) else f"seed {seed}")
    return " · ".join(parts)


def expand(request: dict, each_line: bool = False, variations: int = 1) -> list[dict]:
    """The jobs one press adds: one per non-empty line of the prompt when ``each_line``, each ``variations`` times
    (a fixed seed s gives s, s + n, s + 2n, ... for jobs of n images, so no two images share a seed; a random seed
    stays random)."""
    try:
        variations = int(variations)
    except (TypeError, ValueError):
        raise EngineError(f"Seed variations must be a whole number from 1 to {MAX_ADD}, not {variations!r}.") from None
    if not 1 <= variations <= MAX_ADD:
        raise EngineError(f"Seed variations must be from 1 to {MAX_ADD}, not {variations}.")
    prompt = str(request.get("prompt") or "")
    prompts = [line.strip() for line in prompt.splitlines() if line.strip()] if each_line else [prompt]
    if not prompts:
        raise EngineError("The prompt has no lines to queue: write one prompt per line, or untick "
                          "\"Each line of the prompt is a job\".")
    if len(prompts) * variations > MAX_ADD:
        raise EngineError(f"That makes {len(prompts) * variations} jobs ({len(prompts)} prompts × {variations} "
                          f"variations); the queue takes at most {MAX_ADD} at once.")
    seed = request.get("seed", -1)
    per_job = max(1, _whole(request.get("num_images"), 1))
    jobs = []
    for text in prompts:
        for k in range(variations):
            job = dict(request, prompt=text)
            if seed not in (None, -1) and k:
                job["seed"] = _whole(seed, 0) + k * per_job
            jobs.append(job)
    return jobs


def _whole(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class JobQueue:
    """Image jobs waiting in order, and the workers that run them, started with the first job: one, or as many as
    ``workers()`` says when a job is added (the engine's Ray Serve replicas: each runs one job at a time)."""

    def __init__(self, run: Run, validate: Validate, keep_finished: int = KEEP_FINISHED,
                 who: Optional[Callable[[], Optional[str]]] = None, workers: Callable[[], int] = lambda: 1):
        self._run = run
        self._validate = validate
        self._who = who or (lambda: None)     # who is adding (None: not shared, or the console)
        self._keep = keep_finished
        self._lock = threading.Condition()
        self._waiting: list[QueueItem] = []
        self._running: list[QueueItem] = []      # in the order they started
        self._finished: deque[QueueItem] = deque()
        self._ids = itertools.count(1)
        self._version = 0              # grows with every change: a page redraws only when it moved
        self._workers_wanted = workers
        self._workers: list[threading.Thread] = []
        self._closed = False

    # ------------------------------------------------------------------------------------------ adding
    def add(self, requests: list[dict], owner: Optional[str], tab: str) -> list[str]:
        """Queue ``requests`` (in order) for ``owner``, their images for ``tab``; returns their ids. Each is checked
        first: if one is wrong, none is queued and the EngineError says which."""
        requests = list(requests)
        viewer = self._who()
        for number, request in enumerate(requests, 1):
            try:
                self._validate(request)
            except EngineError as exc:
                which = f"Job {number} of {len(requests)}: " if len(requests) > 1 else ""
                raise EngineError(f"{which}{exc} Nothing was queued.") from None
        with self._lock:
            if self._closed:
                raise EngineError("The queue is closed: the studio is shutting down.")
            if len(self._waiting) + len(requests) > MAX_WAITING:
                raise EngineError(f"The queue is full ({len(self._waiting)} jobs wait; at most {MAX_WAITING}). "
                                  "Queue more when some have run, or cancel some.")
            items = [QueueItem(id=f"q{next(self._ids)}", owner=owner, tab=tab, request=dict(request),
                               summary=summary(request), job=Job(owner=owner), viewer=viewer) for request in requests]
            self._waiting.extend(items)
            self._changed()
            self._start_worker()
        return [item.id for item in items]

    # ------------------------------------------------------------------------------------ moving, cancel
    def move(self, item_id: str, owner: Optional[str], step: int) -> bool:
        """Move a waiting item of ``owner`` one place earlier (step -1) or later (+1) among that owner's waiting
        items (others' keep their places); False when it cannot move."""
        with self._lock:
            mine = [i for i, item in enumerate(self._waiting) if item.owner == owner]
            spot = next((k for k, i in enumerate(mine) if self._waiting[i].id == item_id), None)
            if spot is None or not 0 <= spot + step < len(mine):
                return False
            a, b = mine[spot], mine[spot + step]
            self._waiting[a], self._waiting[b] = self._waiting[b], self._waiting[a]
            self._changed()
            return True

    def cancel(self, item_id: str, owner: Optional[str]) -> bool:
        """Cancel one item of ``owner``: a waiting one never runs; the running one stops after its current step."""
        with self._lock:
            item = next((i for i in self._waiting if i.id == item_id and i.owner == owner), None)
            if item is not None:
                self._waiting.remove(item)
                self._finish(item, CANCELLED, "Cancelled before it ran.")
                return True
            running = next((i for i in self._running if i.id == item_id and i.owner == owner), None)
            if running is not None:
                running.job.cancel()
                running.message = "Cancelling after this step…"
                self._changed()
                return True
        return False

    def clear_finished(self, owner: Optional[str]) -> int:
        """Drop ``owner``'s finished items from the list (their images stay in outputs/); returns how many."""
        with self._lock:
            mine = [item for item in self._finished if item.owner == owner]
            for item in mine:
                self._finished.remove(item)
            if mine:
                self._changed()
            return len(mine)

    # ------------------------------------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        return self._version

    def snapshot(self, owner: Optional[str]) -> dict:
        """What ``owner`` sees: {"version", "items": [{"id", "state", "position" (1 = runs next; waiting only),
        "summary", "tab", "steps", "message", "images"}], "others": how many of other people's jobs run or wait
        ahead of this owner's first}. Running first, then waiting in order, then finished, newest first."""
        with self._lock:
            items, others = [], 0
            for running in self._running:
                if running.owner == owner:
                    items.append(self._view(running))
                else:
                    others += 1
            mine_seen = False
            for position, item in enumerate(self._waiting, 1):
                if item.owner == owner:
                    mine_seen = True
                    items.append(self._view(item, position))
                elif not mine_seen:
                    others += 1
            items += [self._view(item) for item in reversed(self._finished) if item.owner == owner]
            return {"version": self._version, "items": items, "others": others}

    @staticmethod
    def _view(item: QueueItem, position: Optional[int] = None) -> dict:
        return {"id": item.id, "state": item.state, "position": position, "summary": item.summary, "tab": item.tab,
                "steps": list(item.steps), "message": item.message,
                "images": [r["path"] for r in item.results if r.get("path")]}

    def take_results(self, owner: Optional[str]) -> dict[str, list[dict]]:
        """The results of ``owner``'s jobs finished since the last call, by tab ({tab: [result dicts, newest
        first]}); each job's results are handed over once."""
        with self._lock:
            out: dict[str, list[dict]] = {}
            for item in self._finished:          # oldest first: the newest job's images end up first
                if item.owner == owner and item.state == DONE and not item.delivered:
                    item.delivered = True
                    out[item.tab] = list(item.results) + out.get(item.tab, [])
            return out

    def pending_results(self, owner: Optional[str]) -> int:
        """How many of ``owner``'s finished jobs have results not yet handed over (a page opened since)."""
        with self._lock:
            return sum(1 for item in self._finished if item.owner == owner and item.state == DONE
                       and not item.delivered)

    # ------------------------------------------------------------------------------------------- worker
    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits (tests, shutdown); False on timeout."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._waiting or self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def close(self) -> None:
        """No more jobs: the waiting ones are cancelled, the running one stops after its step."""
        with self._lock:
            self._closed = True
            for item in list(self._waiting):
                self._finish(item, CANCELLED, "The studio stopped before it ran.")
            self._waiting.clear()
            for running in self._running:
                running.job.cancel()
            self._lock.notify_all()

    def _start_worker(self) -> None:
        """(Lock held.) Workers up to ``workers()`` (at least one)."""
        self._workers = [w for w in self._workers if w.is_alive()]
        while len(self._workers) < max(1, int(self._workers_wanted() or 1)):
            worker = threading.Thread(target=self._work, name=f"flux-studio-queue-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                item = self._waiting.pop(0)
                item.state = RUNNING
                self._running.append(item)
                self._changed()
            state, message, results = self._run_one(item)
            with self._lock:
                self._running.remove(item)
                item.results = results
                self._finish(item, state, message)

    def _run_one(self, item: QueueItem) -> tuple[str, str, list]:
        def progress(done: int, total: int, message: str) -> None:
            item.steps = (int(done), int(total or 0))
            with self._lock:
                self._changed()
        try:
            extra = {"viewer": item.viewer} if item.viewer is not None else {}
            return DONE, "", list(self._run(item.request, progress=progress, job=item.job, **extra) or [])
        except JobCancelled:
            return CANCELLED, "Cancelled while it ran; nothing was saved.", []
        except EngineError as exc:
            return FAILED, str(exc), []
        except Exception as exc:  # noqa: BLE001 - a bug: logged; the queue goes on with the next job
            log.exception("queued job %s failed", item.id)
            return FAILED, f"Unexpected error ({type(exc).__name__}: {exc}); details are in the console.", []

    def _finish(self, item: QueueItem, state: str, message: str) -> None:
        """(Lock held.) The item is finished: listed among the finished, the oldest dropped past the limit."""
        item.state, item.message = state, message
        self._finished.append(item)
        while len(self._finished) > self._keep:
            self._finished.popleft()
        self._changed()

    def _changed(self) -> None:
        """(Lock held.)"""
        self._version += 1
        self._lock.notify_all()
