"""Serving the studio beyond one GPU: ``launch.py --serve ray`` runs the engine as a Ray Serve deployment.

Each replica of the deployment (one per GPU, on this machine or on the other machines of a Ray cluster) is a whole
studio engine that runs validated jobs; this process keeps the page, the queue, History and the outputs folder, and
hands each job to a free replica through a ``DeploymentHandle`` (``Engine.executor``). Imported only with
``--serve ray``: the studio itself never imports ray (``requirements-serve.txt`` installs it).

Modules: ``ray_serve`` (the deployment, and starting Ray and Serve), ``executor`` (the page's side: one job on a
replica, its progress, previews and cancel, a retry on another replica when one dies), ``results`` (a replica's
images and their input copies carried back and saved in this studio's outputs folder).
"""
from __future__ import annotations

import os

# Ray reports usage statistics to its authors unless told not to; the studio contacts no outside host unasked.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_ray_serving(engine, address=None, replicas=None, min_replicas=None, max_replicas=None, **init_options):
    """Connect to (or start) Ray, deploy the replicas with ``engine``'s settings and make ``engine`` run its jobs on
    them; they stop when this process ends. Returns the ``RemoteExecutor`` (``describe()`` says what runs where)."""
    import atexit

    from .executor import RemoteExecutor
    from .ray_serve import connect, deploy, replica_settings, shutdown

    connect(address, **init_options)
    handle, plan = deploy(replica_settings(engine), replicas=replicas, min_replicas=min_replicas,
                          max_replicas=max_replicas)
    executor = RemoteExecutor(handle, engine.work, speed=engine.speed_settings, plan=plan)
    engine.executor = executor
    atexit.register(shutdown)           # the replicas stop with the page (a cluster's Ray runs on)
    return executor
