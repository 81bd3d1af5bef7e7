"""The page's side of ``--serve ray``: the studio engine's executor (``Engine.executor``) that runs each job on a
replica of the deployment instead of here.

``run`` is called by ``Engine.generate`` after the request is validated, as a local job would be run: the ValidJob
(its input images already read, so a replica on another machine needs none of this machine's files) goes to a free
replica through the ``DeploymentHandle``; the replica's progress and previews come back as they happen; its images
are saved in this studio's outputs folder (``results.save_results``). A cancelled job cancels its request, which
stops the job on the replica at its next step. When the replica dies (its machine went away, it was killed, it ran
out of memory), the job runs again from the start on another replica, up to ``RETRIES`` times.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable, Optional

from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import ReplicaUnavailableError

from engine.errors import EngineError, JobCancelled

from .results import save_results

RETRIES = 3                    # further replicas a job may try after the one running it died
WATCH_EVERY_S = 0.1            # how often a job's cancel flag is looked at while it runs remotely
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)    # ActorDiedError and ActorUnavailableError are RayActorErrors
# RequestCancelledError is a TaskCancelledError; a request cancelled before a replica took it ends as CancelledError
CANCELLED = (TaskCancelledError, concurrent.futures.CancelledError, asyncio.CancelledError)


class RemoteExecutor:
    """Runs the studio's jobs on the replicas behind ``handle`` (``ray_serve.deploy``). ``work``: the page's scratch
    folder (previews); ``speed``: the speed settings to send with each job (``Engine.speed_settings``)."""

    def __init__(self, handle: Any, work: Any, speed: Optional[Callable[[], dict]] = None,
                 plan: Optional[dict] = None, retries: int = RETRIES):
        self._handle = handle.options(stream=True)
        self._work = work
        self._speed = speed or (lambda: None)
        self._retries = retries
        self.plan = dict(plan or {})
        self._lock = threading.Lock()
        self._placed: dict = {}          # Job -> the replica running it now

    @property
    def slots(self) -> int:
        """How many jobs can run at once: the replicas (the most the autoscaler may start)."""
        scaling = self.plan.get("autoscaling") or {}
        return int(scaling.get("max_replicas") or self.plan.get("replicas") or 1)

    def describe(self) -> str:
        """What runs where, in one line for the console."""
        scaling = self.plan.get("autoscaling")
        count = (f"{scaling['min_replicas']} to {scaling['max_replicas']} replicas (autoscaled)" if scaling
                 else f"{self.plan.get('replicas', '?')} replica(s)")
        each = "one GPU" if self.plan.get("per_replica", {}).get("num_gpus") else \
            f"{self.plan.get('per_replica', {}).get('num_cpus', 1)} CPU(s)"
        return (f"Ray Serve: {count}, each with {each}, on a cluster of {self.plan.get('nodes', '?')} node(s) "
                f"({self.plan.get('gpus', 0)} GPUs, {self.plan.get('cpus', 0)} CPUs).")

    def replica_of(self, job: Any) -> Optional[dict]:
        """The replica running ``job`` now ({"pid", "actor_id", "actor_name", "node"}); None before it starts."""
        with self._lock:
            return self._placed.get(job)

    def run(self, valid: Any, outputs_dir: Any, progress: Callable[[int, int, str], None], job: Any,
            preview: Optional[Callable[[str], None]] = None) -> list[dict]:
        """Run the validated job ``valid`` on a replica; its images are saved in ``outputs_dir``. Returns the results
        as ``Engine.generate`` does (each also names its ``"replica"``); JobCancelled when ``job`` is cancelled."""
        gone = []
        try:
            for _ in range(self._retries + 1):
                if job.cancelled:
                    raise JobCancelled("Cancelled before it ran.")
                try:
                    return self._attempt(valid, outputs_dir, progress, job, preview)
                except REPLICA_GONE as exc:
                    where = self.replica_of(job) or {}
                    gone.append(f"{where.get('actor_name', 'a replica')}: {type(exc).__name__}")
                    progress(0, 0, f"The replica running this job stopped ({gone[-1]}); it runs again on another.")
                    with self._lock:
                        self._placed.pop(job, None)
        finally:
            with self._lock:
                self._placed.pop(job, None)
        raise EngineError(f"The job's replica stopped {len(gone)} times ({'; '.join(gone)}), so it was given up. "
                          f"See `ray status` and the replicas' logs (Ray's dashboard or /tmp/ray/session_latest/logs).")

    def _attempt(self, valid, outputs_dir, progress, job, preview) -> list[dict]:
        response = self._handle.run.remote(valid, self._speed(), preview is not None)
        ended = threading.Event()
        watcher = threading.Thread(target=_cancel_when_asked, args=(job, response, ended), daemon=True,
                                   name="flux-studio-remote-cancel")
        watcher.start()
        replica = None
        try:
            for event in response:
                kind = event[0]
                if kind == "started":
                    replica = event[1]
                    with self._lock:
                        self._placed[job] = replica
                elif kind == "progress":
                    progress(*event[1:])
                elif kind == "preview" and preview is not None:
                    preview(str(self._save_preview(event[1])))
                elif kind == "error":
                    raise event[1]
                elif kind == "done":
                    return save_results(event[1], outputs_dir, replica)
            raise EngineError("The replica ended the job without its images; run it again.")
        except CANCELLED:
            raise JobCancelled("Cancelled; memory released.") from None
        finally:
            ended.set()

    def _save_preview(self, data: bytes):
        from engine import safe_files
        path = safe_files.write_bytes(self._work.new_path("preview", ".jpg"), data)
        self._work.prune()
        return path


def _cancel_when_asked(job: Any, response: Any, ended: threading.Event) -> None:
    """Cancel ``response`` once ``job`` is cancelled (its owner's Cancel, a closed tab); the replica stops the job
    at its next step. Ends with the job."""
    while not ended.wait(WATCH_EVERY_S):
        if job.cancelled:
            response.cancel()
            return
