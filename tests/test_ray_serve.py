"""launch.py --serve ray: the studio's jobs on two CPU replicas of a Ray Serve deployment (a local Ray instance, the
demo model): two jobs run at once on two replicas and give the local engine's pixels seed for seed; progress and
previews come back; a cancel stops the job on its replica; a killed replica's job runs again on the other.

Needs requirements-serve.txt (ray[serve]) installed: CI installs it for this file."""
import os
import pathlib
import threading
import time

import numpy as np
import pytest
import ray
from PIL import Image

from engine import JobCancelled
from studio.engine import Engine
from studio.jobs import Job
from studio.serving import start_ray_serving

SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 3}
LONG = {**SMALL, "num_inference_steps": 40}        # ~1-2 s on one CPU thread: time to kill its replica


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def local(demo_dir, tmp_path_factory):
    """The same jobs on a studio engine in this process: what the replicas must give."""
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def served(demo_dir, tmp_path_factory, local):
    """(the page's engine, its RemoteExecutor, {seed: the local engine's result}): two replicas of one CPU each on
    a local Ray instance."""
    front = Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("front"))
    references = {}

    def make_references():     # while Ray starts the replicas (their processes import torch and load the model)
        for seed in (11, 12):
            references[seed] = local.generate({**LONG, "seed": seed})[0]

    maker = threading.Thread(target=make_references)
    maker.start()
    executor = start_ray_serving(front, replicas=2, num_cpus=2, include_dashboard=False, log_to_driver=False,
                                 configure_logging=False)
    maker.join()
    yield front, executor, references
    ray.shutdown()        # the local instance, replicas and all


def run_in_thread(front, request, job=None, preview=None):
    """Start ``front.generate(request)`` in a thread; returns (thread, {"results" | "error", "progress"})."""
    out = {"progress": []}

    def work():
        try:
            out["results"] = front.generate(request, progress=lambda d, t, m: out["progress"].append(
                (d, t, m, time.monotonic())), job=job, preview=preview)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc
    thread = threading.Thread(target=work)
    thread.start()
    return thread, out


def test_two_jobs_run_at_once_on_two_replicas_seed_for_seed(served):
    front, executor, references = served
    assert executor.slots == 2 and "2 replica(s)" in executor.describe()
    previews = []
    jobs = [run_in_thread(front, {**LONG, "seed": 11}, preview=previews.append),
            run_in_thread(front, {**LONG, "seed": 12})]
    for thread, _ in jobs:
        thread.join(60)
    outs = [out for _, out in jobs]
    assert all("results" in out for out in outs), [out.get("error") for out in outs]
    made = [out["results"][0] for out in outs]
    replicas = [result["replica"] for result in made]
    assert replicas[0]["pid"] != replicas[1]["pid"] and os.getpid() not in {r["pid"] for r in replicas}
    # at once: each job's steps began before the other's ended
    steps = [[p[3] for p in out["progress"] if p[1] == 40] for out in outs]
    assert steps[0][0] < steps[1][-1] and steps[1][0] < steps[0][-1]
    for out in outs:
        assert [p[:2] for p in out["progress"] if p[1] == 40] == [(k, 40) for k in range(1, 41)]
    assert previews and all(os.path.isfile(p) and p.endswith(".jpg") for p in previews)
    for seed, result in zip((11, 12), made):
        local = references[seed]
        assert np.array_equal(pixels(result["path"]), pixels(local["path"]))        # the same image, seed for seed
        assert result["recipe"] == local["recipe"] and result["info"] == local["info"]
        assert front.read_recipe(result["path"])["seed"] == seed                    # saved here, with its recipe
        assert os.path.dirname(os.path.dirname(result["path"])) == str(front.outputs_dir)


def test_cancel_stops_the_job_on_its_replica(served):
    front, executor, _ = served
    before = sorted(front.outputs_dir.rglob("*.png"))
    job = Job(owner="visitor")
    thread, out = run_in_thread(front, {**SMALL, "num_inference_steps": 200, "num_images": 16, "seed": 3}, job=job)
    deadline = time.monotonic() + 30
    while not [p for p in out["progress"] if p[0] >= 2] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.replica_of(job) is not None
    assert front.cancel(owner="visitor") == 1
    thread.join(10)
    assert isinstance(out.get("error"), JobCancelled)
    assert sorted(front.outputs_dir.rglob("*.png")) == before
    # The replica stopped its job: both replicas take the next two jobs at once and finish them soon (one still
    # running 3200 steps would hold its engine's lock for minutes).
    started = time.monotonic()
    jobs = [run_in_thread(front, {**SMALL, "seed": 11}), run_in_thread(front, {**SMALL, "seed": 12})]
    for thread, _ in jobs:
        thread.join(30)
    assert all("results" in o for _, o in jobs), [o.get("error") for _, o in jobs]
    assert len({o["results"][0]["replica"]["pid"] for _, o in jobs}) == 2
    assert time.monotonic() - started < 20


def test_a_killed_replica_fails_over_to_the_other(served):
    front, executor, references = served
    job = Job()
    thread, out = run_in_thread(front, {**LONG, "seed": 12}, job=job)
    deadline = time.monotonic() + 30
    while not [p for p in out["progress"] if p[1] == 40 and p[0] >= 1] and time.monotonic() < deadline:
        time.sleep(0.02)
    doomed = executor.replica_of(job)
    assert doomed is not None and "results" not in out
    ray.kill(ray.get_actor(doomed["actor_name"], namespace="serve"), no_restart=True)
    thread.join(60)
    assert "results" in out, out.get("error")
    result = out["results"][0]
    assert result["replica"]["pid"] != doomed["pid"]
    assert any("runs again on another" in p[2] for p in out["progress"])
    assert np.array_equal(pixels(result["path"]), pixels(references[12]["path"]))


class _Stream:
    """A fake DeploymentResponseGenerator: its events, then ``end`` raised (None: it just ends)."""

    def __init__(self, events, end=None):
        self.events, self.end, self.cancelled = list(events), end, False

    def __iter__(self):
        yield from self.events
        if self.end is not None:
            raise self.end

    def cancel(self):
        self.cancelled = True


class _Handle:
    """A fake DeploymentHandle handing out one scripted stream per call."""

    def __init__(self, streams):
        self.streams, self.calls = list(streams), 0
        self.run = self

    def options(self, stream=False):
        assert stream
        return self

    def remote(self, valid, speed, previews):
        self.calls += 1
        return self.streams.pop(0)


def test_executor_retries_a_dead_replica_passes_errors_on_and_gives_up(tmp_path):
    from engine import EngineError
    from ray.exceptions import ActorDiedError
    from studio.serving.executor import RETRIES, RemoteExecutor
    from studio.work_files import WorkFolder
    replica = {"pid": 1, "actor_name": "SERVE_REPLICA::a"}
    said = []
    handle = _Handle([_Stream([("started", replica), ("progress", 1, 3, "step 1")], ActorDiedError()),
                      _Stream([("started", replica), ("error", EngineError("No such LoRA: x.safetensors."))])])
    executor = RemoteExecutor(handle, WorkFolder(tmp_path))
    with pytest.raises(EngineError, match="No such LoRA"):          # the replica's error, as the page shows them
        executor.run(object(), tmp_path, lambda d, t, m: said.append(m), Job())
    assert handle.calls == 2 and any("SERVE_REPLICA::a" in m and "runs again" in m for m in said)
    handle = _Handle([_Stream([], ActorDiedError()) for _ in range(RETRIES + 1)])
    with pytest.raises(EngineError, match=f"stopped {RETRIES + 1} times"):
        RemoteExecutor(handle, WorkFolder(tmp_path)).run(object(), tmp_path, lambda *a: None, Job())
    job = Job()
    job.cancel()
    with pytest.raises(JobCancelled):                                # cancelled before it was sent: never sent
        RemoteExecutor(_Handle([]), WorkFolder(tmp_path)).run(object(), tmp_path, lambda *a: None, job)


def test_a_replicas_images_and_input_copies_are_saved_here(tmp_path):
    from studio import recipes
    from studio.serving.results import pack_results, save_results
    image = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))
    made = recipes.save_image(image, {"seed": 5, "prompt": "p", "width": 48, "height": 32}, tmp_path / "replica")
    Image.new("RGB", (8, 8), "red").save(recipes.beside(made, ".ref0.png"))
    result = {"path": str(made), "seed": 5, "width": 48, "height": 32, "recipe": {"seed": 5, "prompt": "p"},
              "info": "p"}
    packed = pack_results([result])
    assert not any((tmp_path / "replica").rglob("*.png"))            # nothing is left on the replica
    packed[0]["copies"]["/../../escape.png"] = b"x"                  # a name that is not beside the image: ignored
    saved = save_results(packed, tmp_path / "page", {"pid": 7})[0]
    path = pathlib.Path(saved["path"])
    assert path.parent.parent == tmp_path / "page" and saved["replica"] == {"pid": 7} and saved["seed"] == 5
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert recipes.read_recipe(path)["prompt"] == "p"
    assert Image.open(recipes.beside(path, ".ref0.png")).getpixel((0, 0)) == (255, 0, 0)
    assert not list(tmp_path.rglob("escape.png"))


def test_replicas_one_per_gpu_cpus_shared_or_autoscaled():
    from engine import EngineError
    from studio.serving.ray_serve import plan_replicas
    four = plan_replicas(gpus=4, cpus=32)
    assert four["num_replicas"] == 4 and four["ray_actor_options"]["num_gpus"] == 1
    assert four["max_ongoing_requests"] == 1                        # one job per replica: Serve routes to free ones
    cpu = plan_replicas(gpus=0, cpus=8)
    assert cpu["num_replicas"] == 1 and cpu["ray_actor_options"] == {"num_cpus": 8}
    assert plan_replicas(gpus=0, cpus=3, replicas=2)["ray_actor_options"] == {"num_cpus": 1}
    scaled = plan_replicas(gpus=8, cpus=64, min_replicas=0, max_replicas=6)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 6, "initial_replicas": 0,
                                            "target_ongoing_requests": 1}
    with pytest.raises(EngineError, match="--min-replicas \\(3\\) is more than --max-replicas \\(2\\)"):
        plan_replicas(gpus=2, cpus=8, min_replicas=3, max_replicas=2)
    with pytest.raises(EngineError, match="--replicas must be 1 or more"):
        plan_replicas(gpus=2, cpus=8, replicas=0)


def test_launch_serve_flags_are_checked():
    import launch
    parser = launch.build_parser()

    def problem(*argv):
        return launch.serve_problem(parser.parse_args(list(argv)))

    assert problem() is None and problem("--serve", "ray", "--ray-address", "auto", "--replicas", "2") is None
    assert "only with --serve ray" in problem("--replicas", "2")
    assert "--min-replicas (4) is more than --max-replicas (2)" in problem("--serve", "ray", "--min-replicas", "4",
                                                                            "--max-replicas", "2")
    assert "--max-replicas must be 1 or more" in problem("--serve", "ray", "--max-replicas", "0")
