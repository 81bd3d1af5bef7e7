"""Who a job belongs to, and its own cancel flag.

A studio shared through a link serves several people at once: a cancel must stop the job of the person who pressed
it, never someone else's. Each image job carries a ``Job``: its owner (the studio passes the browser session) and a
flag that the engine checks after every step. The studio also cancels a job itself when the web queue drops its
event (the client cancelled, the tab was closed), through the same flag.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Optional

REMEMBER_CANCELS = 1024      # owners whose last cancel is kept (a waiting job asked before it does not run)


class Job:
    """One image job: ``owner`` (any hashable; None for a script's job), when it was asked for (``asked_at``,
    ``time.monotonic()``; a job still waiting in the web queue is older than its start) and its cancel flag."""

    def __init__(self, owner: Optional[str] = None, asked_at: Optional[float] = None):
        self.owner = owner
        self.asked_at = time.monotonic() if asked_at is None else asked_at
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The job stops after its current step and saves nothing more."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __repr__(self) -> str:
        return f"Job(owner={self.owner!r}, cancelled={self.cancelled})"


class JobBoard:
    """The jobs the engine is running or about to run (waiting for the one job slot), for ``cancel(owner)``; and
    when each owner last cancelled, so that a job they asked for before that (it was still waiting in the web
    queue, out of the engine's sight) is cancelled as it arrives."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: list[Job] = []
        self._cancelled_at: OrderedDict = OrderedDict()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)
            cancelled_at = self._cancelled_at.get(job.owner) if job.owner is not None else None
        if cancelled_at is not None and cancelled_at >= job.asked_at:
            job.cancel()

    def remove(self, job: Job) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)

    def cancel(self, owner: Optional[str] = None) -> int:
        """Cancel the jobs of ``owner`` (all jobs when None: a script or the console owns the whole engine);
        returns how many were cancelled."""
        with self._lock:
            mine = [j for j in self._jobs if owner is None or j.owner == owner]
            if owner is not None:
                self._cancelled_at[owner] = time.monotonic()
                self._cancelled_at.move_to_end(owner)
                while len(self._cancelled_at) > REMEMBER_CANCELS:
                    self._cancelled_at.popitem(last=False)
        for job in mine:
            job.cancel()
        return len(mine)
