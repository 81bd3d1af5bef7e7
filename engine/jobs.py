"""Who a job belongs to, and its own cancel flag.

A studio shared through a link serves several people at once: a cancel must stop the job of the person who pressed
it, never someone else's. Each image job carries a ``Job``: its owner (the studio passes the browser session) and a
flag that the engine checks after every step. The studio also cancels a job itself when the web queue drops its
event (the client cancelled, the tab was closed), through the same flag.
"""
from __future__ import annotations

import threading
from typing import Optional


class Job:
    """One image job: ``owner`` (any hashable; None for a script's job) and its cancel flag."""

    def __init__(self, owner: Optional[str] = None):
        self.owner = owner
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
    """The jobs the engine is running or about to run (waiting for the one job slot), for ``cancel(owner)``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: list[Job] = []

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)

    def remove(self, job: Job) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)

    def cancel(self, owner: Optional[str] = None) -> int:
        """Cancel the jobs of ``owner`` (all jobs when None: a script or the console owns the whole engine);
        returns how many were cancelled."""
        with self._lock:
            mine = [j for j in self._jobs if owner is None or j.owner == owner]
        for job in mine:
            job.cancel()
        return len(mine)
