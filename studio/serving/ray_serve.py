"""The studio's engine as a Ray Serve deployment: each replica a whole studio engine that runs validated jobs.

A replica (``StudioReplica``) holds one GPU (``num_gpus=1``; on a machine without GPUs, CPUs) and takes one job at a
time (``max_ongoing_requests=1``), so Serve routes each job to a free replica and keeps the others waiting in its
queue. ``run`` is a generator: it says which replica took the job, then streams the job's progress (and previews,
when asked) and ends with the images (``results.pack_results``) or the error. When the caller cancels the request,
the job stops at its next step, as a local job does.

``connect`` starts Ray on this machine or joins a cluster (``address="auto"``), shipping this folder's code to the
replicas (Ray's ``working_dir``); ``deploy`` starts Serve (no HTTP proxy: the studio's page is the only front end)
and the replicas, a fixed number or autoscaled between limits.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
import threading
from typing import Any, Optional

import ray
from ray import serve

from engine.errors import EngineError, JobCancelled

APP_NAME = "flux-studio"
DEPLOYMENT_NAME = "StudioReplica"
REPO = pathlib.Path(__file__).resolve().parents[2]
# What the replicas need of this folder is the code: never the models, the images or the virtual environment.
SHIPPED_EXCLUDES = [".git", ".venv", "models", "outputs", "tests", "benchmarks", "**/__pycache__", "*.pyc"]

log = logging.getLogger("flux_studio")


class StudioReplica:
    """One replica: a studio engine (the page's settings: models folder, demo, device, VRAM and RAM limits) with a
    scratch outputs folder of its own, whose images go back to the page's studio."""

    def __init__(self, settings: dict):
        from studio.engine import configure_engine
        context = ray.get_runtime_context()
        self.identity = {"pid": os.getpid(), "actor_id": context.get_actor_id(),
                         "actor_name": context.get_actor_name(), "node": ray.util.get_node_ip_address()}
        settings = dict(settings)
        ram_limit = settings.pop("ram_limit", None)
        preload = settings.pop("preload", True)
        self._scratch = tempfile.mkdtemp(prefix="flux-studio-replica-")
        self.engine = configure_engine(**settings, outputs_dir=self._scratch)
        self.engine.models.ram_limit = ram_limit
        self._lock = threading.Lock()     # one job at a time (a cancelled one may still be finishing its step)
        if preload:                       # the default model, so that the first job does not wait for it
            self._preload()

    def __del__(self):            # Serve calls it when the replica stops: its scratch folder goes with it
        shutil.rmtree(getattr(self, "_scratch", ""), ignore_errors=True)

    def _preload(self) -> None:
        try:
            with self._lock:
                self.engine.pipeline(self.engine.default_variant())
        except Exception as exc:  # noqa: BLE001 - the replica still serves; a job says what is wrong
            log.warning("replica %s could not load the default model: %s", self.identity["actor_name"], exc)

    def whoami(self) -> dict:
        """{"pid", "actor_id", "actor_name", "node"}: which replica answered."""
        return dict(self.identity)

    async def run(self, valid, speed: Optional[dict] = None, previews: bool = False):
        """Run one validated job (``Engine.validate``'s ValidJob). Yields ("started", identity), then ("progress",
        done, total, message) and ("preview", JPEG bytes) events, and last ("done", packed results) or ("error",
        exception)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        from studio.jobs import Job
        job = Job()
        loop.run_in_executor(None, self._work, valid, speed, previews, job, put)
        try:
            yield ("started", dict(self.identity))
            while True:
                event = await events.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            job.cancel()     # the request was cancelled or its caller went away: stop at the next step (no-op if done)

    # --------------------------------------------------------------------------------------- in a thread
    def _work(self, valid, speed, previews, job, put) -> None:
        from .results import pack_results
        try:
            with self._lock:
                results = self._run(valid, speed, previews, job, put)
            put(("done", pack_results(results)))
        except EngineError as exc:                       # JobCancelled too: said to the page as they are
            put(("error", exc))
        except Exception as exc:  # noqa: BLE001 - a bug: its traceback stays in this replica's log
            log.exception("job failed on replica %s", self.identity["actor_name"])
            put(("error", RuntimeError(f"on replica {self.identity['actor_name']} ({self.identity['node']}): "
                                       f"{type(exc).__name__}: {exc}")))

    def _run(self, valid, speed, previews, job, put) -> list[dict]:
        from studio.engine import release_after_job
        engine = self.engine
        if speed:
            engine.set_acceleration(**speed)     # the page's Settings tab: the same speed settings as a local job
        valid = dataclasses.replace(valid, models_dir=engine.models_dir)    # this machine's models folder

        def check_cancel() -> None:
            if job.cancelled:
                raise JobCancelled("Cancelled; memory released.")

        def preview(path: str) -> None:     # a JPEG in the replica's scratch folder: its bytes go to the page
            put(("preview", pathlib.Path(path).read_bytes()))

        check_cancel()
        finished = False
        try:
            results = engine.run_valid(valid, lambda done, total, message: put(("progress", done, total, message)),
                                       check_cancel, preview if previews else None)
            finished = True
            return results
        finally:
            release_after_job(finished)


# ------------------------------------------------------------------------------------------- starting
def connect(address: Optional[str] = None, **init_options) -> None:
    """Join Ray: ``address`` None starts a local instance (every CPU and GPU of this machine), "auto" joins the
    cluster this machine is part of (``ray start``), or "HOST:PORT". The replicas get this folder's code (Ray's
    ``working_dir``, on this machine too: the same path as on a cluster)."""
    if ray.is_initialized():
        return
    init_options.setdefault("runtime_env", {"working_dir": str(REPO), "excludes": SHIPPED_EXCLUDES})
    try:
        ray.init(address=address, **init_options)
    except ConnectionError as exc:
        raise EngineError(f"Could not reach the Ray cluster at {address!r} ({exc}). Start it first (ray start --head "
                          f"on one machine, ray start --address=HEAD:6379 on the others, this one too) and use "
                          f"--ray-address auto; a HOST:PORT address also needs RAY_AUTH_MODE=token when the cluster "
                          f"uses Ray's token (~/.ray/auth_token, the same file on every machine). Or leave "
                          f"--ray-address out to start Ray on this machine only.") from None


def replica_settings(engine) -> dict:
    """What each replica's engine is made with: the page's models folder (absolute: the replicas do not run in this
    folder), demo flag, device, VRAM and RAM limits."""
    return {"models_dir": str(pathlib.Path(engine.models_dir).resolve()), "demo": bool(engine.demo),
            "device": engine.device, "vram_limit": engine.vram_limit, "ram_limit": engine.models.ram_limit}


def plan_replicas(gpus: float, cpus: float, replicas: Optional[int] = None, min_replicas: Optional[int] = None,
                  max_replicas: Optional[int] = None) -> dict:
    """The deployment's options for a cluster with ``gpus`` GPUs and ``cpus`` CPUs: one replica per GPU by default
    (one on a machine without GPUs), each holding one GPU, or on CPUs a share of them; autoscaled between
    ``min_replicas`` and ``max_replicas`` when either is given."""
    gpus, cpus = int(gpus), int(cpus)
    for name, value in (("replicas", replicas), ("max_replicas", max_replicas)):
        if value is not None and value < 1:
            raise EngineError(f"--{name.replace('_', '-')} must be 1 or more, got {value}.")
    if min_replicas is not None and min_replicas < 0:
        raise EngineError(f"--min-replicas must be 0 or more, got {min_replicas}.")
    count = replicas or max(gpus, 1)
    options: dict = {"name": DEPLOYMENT_NAME, "max_ongoing_requests": 1}
    if min_replicas is not None or max_replicas is not None:
        low = min_replicas if min_replicas is not None else 1
        high = max_replicas if max_replicas is not None else max(count, low, 1)
        if low > high:
            raise EngineError(f"--min-replicas ({low}) is more than --max-replicas ({high}).")
        first = min(max(replicas if replicas is not None else low, low), high)
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": first,
                                         "target_ongoing_requests": 1}
        most = high
    else:
        options["num_replicas"] = count
        most = count
    if gpus:
        options["ray_actor_options"] = {"num_gpus": 1, "num_cpus": 1}
    else:
        options["ray_actor_options"] = {"num_cpus": max(1, cpus // max(most, 1))}
    return options


def deploy(settings: dict, replicas: Optional[int] = None, min_replicas: Optional[int] = None,
           max_replicas: Optional[int] = None) -> tuple[Any, dict]:
    """Start Serve and the studio's replicas (replacing a studio deployment already there); returns (the
    deployment's handle, {"replicas", "autoscaling", "per_replica", "gpus", "cpus", "nodes"})."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    options = plan_replicas(gpus, cpus, replicas, min_replicas, max_replicas)
    serve.start(proxy_location="Disabled")
    app = serve.deployment(StudioReplica).options(**options).bind(settings)
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    plan = {"replicas": options.get("num_replicas"), "autoscaling": options.get("autoscaling_config"),
            "per_replica": options["ray_actor_options"], "gpus": int(gpus), "cpus": int(cpus),
            "nodes": len([n for n in ray.nodes() if n.get("Alive")])}
    return handle, plan


def shutdown() -> None:
    """Stop the studio's replicas (the deployment; Serve and Ray, and any other application on them, run on)."""
    if ray.is_initialized():
        try:
            serve.delete(APP_NAME)
        except Exception as exc:  # noqa: BLE001 - at exit: Ray may be gone already
            log.warning("could not stop the studio's replicas: %s", exc)
