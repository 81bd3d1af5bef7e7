"""The studio's job queue (studio.queue): order, positions, moving and cancelling one by one, owners, prompt lists
and seed variations, results handed to the page once. The engine is stood in for by a function that records what
it ran and waits while told to (the queue's own logic is what is tested here; tests/test_queue_browser.py runs the
real engine through the page)."""
from __future__ import annotations

import threading
import time

import pytest

from engine.errors import EngineError, JobCancelled
from studio.queue import CANCELLED, DONE, FAILED, JobQueue, expand


class FakeEngine:
    """generate(): records the prompt, reports two steps, waits while ``hold`` is clear, honours cancel."""

    def __init__(self):
        self.ran: list[str] = []
        self.hold = threading.Event()
        self.started = threading.Event()

    def validate(self, request):
        if request.get("width") == 17:
            raise EngineError("Width 17 is too small: use 64 or more.")

    def generate(self, request, progress, job):
        self.started.set()
        progress(1, 2, "step")
        while not self.hold.wait(0.01):
            if job.cancelled:
                raise JobCancelled()
        if request.get("prompt") == "boom":
            raise EngineError("The model file is missing.")
        self.ran.append(request["prompt"])
        progress(2, 2, "step")
        return [{"path": f"/out/{request['prompt']}-{request.get('seed')}.png", "seed": request.get("seed")}]


@pytest.fixture
def fake():
    engine = FakeEngine()
    queue = JobQueue(engine.generate, engine.validate)
    yield engine, queue
    engine.hold.set()
    queue.close()


def _states(snapshot):
    return [(item["summary"].split("”")[0].lstrip("“"), item["state"], item["position"]) for item in snapshot["items"]]


def test_jobs_run_in_queue_order_after_moves_and_cancels(fake):
    engine, queue = fake
    ids = queue.add([{"prompt": p} for p in ("a", "b", "c", "d")], owner="me", tab="generate")
    assert engine.started.wait(5)             # "a" runs (held); b, c, d wait at positions 1, 2, 3
    assert _states(queue.snapshot("me")) == [("a", "running", None), ("b", "waiting", 1), ("c", "waiting", 2),
                                             ("d", "waiting", 3)]
    assert queue.snapshot("me")["items"][0]["steps"] == [1, 2]
    assert queue.move(ids[3], "me", -1) and queue.move(ids[3], "me", -1)      # d to the front of the waiting
    assert not queue.move(ids[3], "me", -1)                                     # already first
    assert queue.cancel(ids[2], "me")                                           # c never runs
    assert _states(queue.snapshot("me"))[:3] == [("a", "running", None), ("d", "waiting", 1), ("b", "waiting", 2)]
    engine.hold.set()
    assert queue.wait_idle(10)
    assert engine.ran == ["a", "d", "b"]
    finished = {item["summary"]: item["state"] for item in queue.snapshot("me")["items"]}
    assert list(finished.values()).count(DONE) == 3 and CANCELLED in finished.values()


def test_the_running_job_is_cancelled_after_its_step_and_the_queue_goes_on(fake):
    engine, queue = fake
    first, _ = queue.add([{"prompt": "long"}, {"prompt": "next"}], owner="me", tab="generate")
    assert engine.started.wait(5)
    assert queue.cancel(first, "me")
    deadline = time.monotonic() + 5
    while queue.snapshot("me")["items"][0]["summary"].startswith("“long") and time.monotonic() < deadline:
        time.sleep(0.01)                      # the cancelled job leaves the running slot
    engine.hold.set()
    assert queue.wait_idle(10)
    states = {item["summary"].split("”")[0]: item for item in queue.snapshot("me")["items"]}
    assert states["“long"]["state"] == CANCELLED and "nothing was saved" in states["“long"]["message"]
    assert engine.ran == ["next"]


def test_a_failed_job_says_why_and_a_wrong_request_is_refused_before_anything_is_queued(fake):
    engine, queue = fake
    with pytest.raises(EngineError, match=r"Job 2 of 2: Width 17 is too small.*Nothing was queued"):
        queue.add([{"prompt": "ok"}, {"prompt": "bad", "width": 17}], owner="me", tab="generate")
    assert queue.snapshot("me")["items"] == []
    engine.hold.set()
    queue.add([{"prompt": "boom"}, {"prompt": "after"}], owner="me", tab="generate")
    assert queue.wait_idle(10)
    items = queue.snapshot("me")["items"]
    assert [(i["state"], i["message"]) for i in items] == [(DONE, ""), (FAILED, "The model file is missing.")]
    assert engine.ran == ["after"]


def test_an_owner_sees_and_touches_only_its_own_jobs(fake):
    engine, queue = fake
    theirs = queue.add([{"prompt": "x"}, {"prompt": "y"}], owner="them", tab="generate")
    mine = queue.add([{"prompt": "m1"}, {"prompt": "m2"}], owner="me", tab="edit")
    assert engine.started.wait(5)
    snap = queue.snapshot("me")
    assert snap["others"] == 2                                   # x runs, y waits ahead of mine
    assert [i["summary"] for i in snap["items"]] == ["“m1” · random seed", "“m2” · random seed"]
    assert [i["position"] for i in snap["items"]] == [2, 3]      # positions count everyone's waiting jobs
    assert not queue.cancel(theirs[1], "me") and not queue.move(theirs[1], "me", 1)
    assert queue.move(mine[1], "me", -1)                         # mine swap among themselves; y keeps its place
    assert [i["summary"][:4] for i in queue.snapshot("me")["items"]] == ["“m2”", "“m1”"]
    assert [i["summary"][:3] for i in queue.snapshot("them")["items"]] == ["“x”", "“y”"]
    engine.hold.set()
    assert queue.wait_idle(10)
    assert engine.ran == ["x", "y", "m2", "m1"]
    handed = queue.take_results("me")
    assert list(handed) == ["edit"] and [r["path"] for r in handed["edit"]] == ["/out/m1-None.png",
                                                                                 "/out/m2-None.png"]
    assert queue.take_results("me") == {}                        # once only
    assert queue.clear_finished("me") == 2 and queue.snapshot("me")["items"] == []
    assert len(queue.snapshot("them")["items"]) == 2


def test_a_prompt_list_and_seed_variations_make_one_job_each():
    request = {"prompt": "a fox\n\n  a cat  \na dog", "seed": 100, "num_images": 2, "width": 256}
    jobs = expand(request, each_line=True, variations=3)
    assert [(j["prompt"], j["seed"]) for j in jobs] == [
        ("a fox", 100), ("a fox", 102), ("a fox", 104), ("a cat", 100), ("a cat", 102), ("a cat", 104),
        ("a dog", 100), ("a dog", 102), ("a dog", 104)]
    assert all(j["width"] == 256 for j in jobs) and request["seed"] == 100       # the request is not changed
    assert [j["seed"] for j in expand({"prompt": "p", "seed": -1}, variations=2)] == [-1, -1]   # random stays random
    assert [j["prompt"] for j in expand(request)] == [request["prompt"]]         # one job, lines and all
    with pytest.raises(EngineError, match="at most 64"):
        expand(request, each_line=True, variations=30)
    with pytest.raises(EngineError, match="no lines"):
        expand({"prompt": " \n "}, each_line=True)
    with pytest.raises(EngineError, match="from 1 to 64"):
        expand(request, variations=0)


def test_with_several_workers_queued_jobs_run_side_by_side_in_order():
    """With the engine running jobs on Ray Serve replicas (``workers()`` = their number), queued jobs start as
    soon as a worker is free, in queue order; the panel shows each running one, cancel reaches any of them."""
    started, release = [], threading.Event()

    def run(request, progress=None, job=None, **_):
        started.append(request["n"])
        for _ in range(400):                 # a job of "steps" until released (or cancelled)
            released = release.wait(0.01)
            if job.cancelled:
                raise JobCancelled("cancelled")
            if released:
                break
        return [{"path": f"/x/{request['n']}.png", "seed": request["n"]}]

    queue = JobQueue(run, validate=lambda request: None, workers=lambda: 2)
    ids = queue.add([{"n": 1}, {"n": 2}, {"n": 3}], owner="me", tab="generate")
    end = time.monotonic() + 10
    while len(started) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.1)
    snap = queue.snapshot("me")
    assert started == [1, 2] and [i["state"] for i in snap["items"]][:2] == ["running", "running"]
    assert snap["items"][2]["position"] == 1
    assert queue.cancel(ids[1], "me")        # the second running job stops at its next step
    release.set()
    assert queue.wait_idle(10)
    states = {i["id"]: i["state"] for i in queue.snapshot("me")["items"]}
    assert (states[ids[0]], states[ids[1]], states[ids[2]]) == (DONE, CANCELLED, DONE) and started == [1, 2, 3]
    queue.close()
