"""A studio several people share (issue 21, item 2; studio/sharing.py, app/visitors.py): who counts as shared, each
person's part of the outputs folder, files of others refused by path (requests and Gradio's file route), the queue
per person, History per person, and the limits on one job (--max-pixels, --max-steps, --max-batch) in validation and
on the page. Cheap: no model runs (the engine's runner is replaced by one that saves a PNG as the real one does)."""
from __future__ import annotations

import pathlib
import threading
import time
import types

import pytest
from PIL import Image

from engine.errors import EngineError
from studio import recipes as R
from studio.engine import Engine
from studio.history import Histories
from studio.queue import DONE, RUNNING, JobQueue
from studio.sharing import Limits, Sharing, folder_name, user_key, visitor_key

DEMO = "FLUX.1-dev-random-demo"
ALICE, BOB = visitor_key("a" * 32), visitor_key("b" * 32)


def _engine(tmp_path, sharing=None) -> Engine:
    return Engine(models_dir=tmp_path / "models", demo=True, outputs_dir=tmp_path / "outputs", defer_demo=True,
                  sharing=sharing)


def _fake_run(monkeypatch):
    """The engine's runner, as a function that saves one PNG in the folder it is handed (as runner.run does)."""
    seen = []

    def run(valid, features, models, outputs_dir, progress, check_cancel, preview):
        seen.append(pathlib.Path(outputs_dir))
        path = R.save_image(Image.new("RGB", (16, 16)), {"prompt": valid.settings.prompt, "seed": 7}, outputs_dir)
        return [{"path": str(path), "seed": 7, "width": 16, "height": 16, "recipe": {}}]

    monkeypatch.setattr("studio.engine.runner.run", run)
    monkeypatch.setattr("studio.engine.release_after_job", lambda finished: None)
    return seen


# ---------------------------------------------------------------------------------------------- who is shared
def test_shared_with_a_link_a_login_or_a_space_and_never_on_ones_own_machine():
    assert not Sharing.for_launch(env={}).shared
    assert Sharing.for_launch(share=True, env={}).shared
    assert Sharing.for_launch(space_id="me/studio", env={}).shared
    login = Sharing.for_launch(auth=True, env={})
    assert login.shared and login.by_login and login.reason == "--auth"
    # Limits from the flags, else from the environment (a Space has no command line); none by default.
    limits = Sharing.for_launch(max_steps=20, env={"FLUX_STUDIO_MAX_STEPS": "9", "FLUX_STUDIO_MAX_PIXELS": "1048576",
                                                   "FLUX_STUDIO_MAX_BATCH": "2"}).limits
    assert (limits.max_pixels, limits.max_steps, limits.max_batch) == (2 ** 20, 20, 2)
    assert limits.describe() == "This studio allows up to 1 MP, 20 steps, 2 images per job."
    assert not Sharing.for_launch(env={}).limits.any
    with pytest.raises(EngineError, match="FLUX_STUDIO_MAX_BATCH must be a whole number"):
        Sharing.for_launch(env={"FLUX_STUDIO_MAX_BATCH": "two"})
    with pytest.raises(EngineError, match="--max-steps"):
        Limits(max_steps=0)


def test_launch_takes_the_limits_as_flags():
    import launch

    args = launch.build_parser().parse_args(["--max-pixels", "1048576", "--max-steps", "30", "--max-batch", "2"])
    limits = Sharing.for_launch(share=True, max_pixels=args.max_pixels, max_steps=args.max_steps,
                                max_batch=args.max_batch, env={}).limits
    assert limits.describe() == "This studio allows up to 1 MP, 30 steps, 2 images per job."


def test_a_reloaded_page_is_the_same_visitor_and_a_login_is_the_same_user_anywhere():
    sharing = Sharing(shared=True)
    sharing.bind("session-1", "a" * 32)
    sharing.bind("session-2", "a" * 32)          # the same browser, reloaded: its id came back from its storage
    assert sharing.viewer_for(None, "session-1") == sharing.viewer_for(None, "session-2") == ALICE
    assert sharing.viewer_for(None, "api-client") not in (None, ALICE)     # no page: its session alone
    login = Sharing(shared=True, by_login=True)
    assert login.viewer_for("alice", "session-1") == login.viewer_for("alice", "other") == user_key("alice")
    assert Sharing().viewer_for("alice", "session-1") is None     # not shared: no one is told apart


def test_each_person_has_a_folder_that_no_name_can_escape():
    assert folder_name(user_key("alice")).as_posix() == "alice"
    for odd in ("../../etc", "visitors", "2026-12-06", ".work", "a/b", ""):
        name = folder_name(user_key(odd)).as_posix()
        assert "/" not in name and not name.startswith(".") and name not in ("visitors", "2026-12-06"), name
    visitor = folder_name(ALICE)
    assert visitor.parts[0] == "visitors" and "a" * 32 not in visitor.as_posix()   # the id itself stays secret
    assert folder_name(ALICE) != folder_name(BOB)


# ------------------------------------------------------------------------------------------ folders and files
def test_each_visitor_saves_and_may_name_only_their_own_images(tmp_path, monkeypatch):
    saved = _fake_run(monkeypatch)
    engine = _engine(tmp_path, Sharing(shared=True))
    outputs = engine.outputs_dir
    alice = engine.generate({"variant": DEMO, "prompt": "alice's", "width": 64, "height": 64}, viewer=ALICE)
    bob = engine.generate({"variant": DEMO, "prompt": "bob's", "width": 64, "height": 64}, viewer=BOB)
    assert saved == [outputs / folder_name(ALICE), outputs / folder_name(BOB)]
    alice_png, bob_png = alice[0]["path"], bob[0]["path"]
    scratch = engine.work.new_path("mask")
    scratch.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(scratch)
    with engine.sharing.acting_as(ALICE):
        assert engine.files.contains(alice_png) and engine.files.contains(scratch)
        assert not engine.files.contains(bob_png)
        with pytest.raises(EngineError, match="is not a file the studio may read"):
            engine.read_recipe(bob_png)
        with pytest.raises(EngineError, match="is not a file the studio may read"):     # nor in a request
            engine.validate({"variant": DEMO, "init_image": bob_png, "width": 64, "height": 64})
        assert engine.viewer_outputs() == outputs / folder_name(ALICE)
    # The person at the console (no one asking) owns the whole folder.
    assert engine.files.contains(bob_png) and engine.viewer_outputs() == outputs


def test_one_persons_studio_is_as_it_always_was(tmp_path, monkeypatch):
    saved = _fake_run(monkeypatch)
    engine = _engine(tmp_path)                    # no link, no login, no Space
    engine.sharing.identify = lambda: ALICE       # even a page that says who it is changes nothing
    made = engine.generate({"variant": DEMO, "prompt": "mine", "width": 64, "height": 64})
    assert saved == [engine.outputs_dir] and engine.viewer() is None
    assert pathlib.Path(made[0]["path"]).parent.parent == engine.outputs_dir
    other = engine.outputs_dir / folder_name(BOB) / "2026-01-01" / "00001-1.png"
    other.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(other)
    assert engine.files.contains(other)


def test_the_outputs_folder_is_never_served_by_path_in_a_shared_studio(tmp_path):
    from app.visitors import OutputsGuard, file_guard

    shared, local = _engine(tmp_path / "s", Sharing(shared=True)), _engine(tmp_path / "l")
    assert file_guard(local) == [] and len(file_guard(shared)) == 1
    outputs = shared.outputs_dir.resolve()
    guard = OutputsGuard(None, folder=lambda: outputs)
    image = outputs / "visitors" / "abc" / "2026-12-06" / "00001-7.png"
    assert guard.refused(f"/gradio_api/file={image}")
    assert guard.refused(f"/gradio_api/file/{image}")
    assert guard.refused(f"/gradio_api/file={outputs}/x/../visitors/abc/2026-12-06/00001-7.png")
    assert not guard.refused(f"/gradio_api/file={tmp_path}/gradio/0123abcd/00001-7.png")   # Gradio's cache copies
    assert not guard.refused("/gradio_api/queue/join")


# --------------------------------------------------------------------------------------------------- the queue
def test_the_queue_runs_each_job_as_whoever_queued_it_and_shows_others_only_as_a_count():
    ran, gate = [], threading.Event()

    def run(request, progress=None, job=None, viewer=None):
        gate.wait(10)
        ran.append((request["prompt"], viewer))
        return []

    asking = {"who": ALICE}
    queue = JobQueue(run, validate=lambda request: None, who=lambda: asking["who"])
    queue.add([{"prompt": "a1"}, {"prompt": "a2"}], owner="a" * 32, tab="generate")
    asking["who"] = BOB
    (bob_id,) = queue.add([{"prompt": "b1"}], owner="b" * 32, tab="generate")
    deadline = time.monotonic() + 10
    while queue.snapshot("a" * 32)["items"][0]["state"] != RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)        # the worker takes a1 (and waits at the gate)
    bob_view = queue.snapshot("b" * 32)
    assert [i["summary"][:4] for i in bob_view["items"]] == ["“b1”"] and bob_view["others"] == 2
    assert bob_view["items"][0]["position"] == 2          # a1 runs, a2 waits first: bob's is second in line
    assert not queue.cancel(bob_id, "a" * 32)               # alice cannot cancel bob's job
    gate.set()
    assert queue.wait_idle(10)
    assert ran == [("a1", ALICE), ("a2", ALICE), ("b1", BOB)]
    assert [i["state"] for i in queue.snapshot("b" * 32)["items"]] == [DONE]


def test_the_panel_says_how_many_jobs_are_ahead():
    from app.queue_panel import others_line

    assert others_line(2, True) == "2 jobs ahead of yours (other people's)."
    assert others_line(1, False) == "1 job of other people in the queue."


# ------------------------------------------------------------------------------------------------------ History
def test_history_shows_each_person_only_their_own_images(tmp_path, monkeypatch):
    from app.common import StudioContext
    from tabs.history import Shelf

    _fake_run(monkeypatch)
    engine = _engine(tmp_path, Sharing(shared=True))
    engine.generate({"variant": DEMO, "prompt": "alice's", "width": 64, "height": 64}, viewer=ALICE)
    engine.generate({"variant": DEMO, "prompt": "bob's", "width": 64, "height": 64}, viewer=BOB)
    shelf = Shelf(StudioContext.for_engine(engine))
    for who, prompt in ((ALICE, "alice's"), (BOB, "bob's")):
        with engine.sharing.acting_as(who):
            assert [e.prompt for e in shelf().refresh()] == [prompt]
            shelf().add_to_board("mine", [shelf().refresh()[0].path])
    with engine.sharing.acting_as(ALICE):
        assert shelf().board_items("mine") == [shelf().refresh()[0].path]      # boards are one's own too
    assert shelf() is shelf._whole and len(shelf().refresh()) == 0            # the console: top-level days only
    assert Histories(keep=1).get(tmp_path) is not None


# ------------------------------------------------------------------------------------------------------ limits
def test_limits_are_enforced_in_validation_naming_the_limit_and_the_flag(tmp_path):
    limits = Limits(max_pixels=2 ** 20, max_steps=4, max_batch=2)
    engine = _engine(tmp_path, Sharing(shared=True, limits=limits))
    ok = {"variant": DEMO, "width": 1024, "height": 1024, "num_inference_steps": 4, "num_images": 2}
    assert engine.validate(ok).width == 1024
    for change, words in (({"num_inference_steps": 5}, "at most 4 steps (set with --max-steps"),
                          ({"num_images": 3}, "at most 2 per job (set with --max-batch"),
                          ({"width": 1536}, "at most 1 MP (1,048,576 pixels, set with --max-pixels"),
                          ({"hires_scale": 1.5}, "after the 1.5× hires fix")):
        with pytest.raises(EngineError, match=r".*" + words.replace("(", r"\(").replace("+", r"\+")):
            engine.validate({**ok, **change})
    # Queued jobs are checked as they are queued: nothing queued.
    with pytest.raises(EngineError, match="Nothing was queued"):
        engine.queue.add([{**ok, "num_inference_steps": 9}], owner="a" * 32, tab="generate")
    # Without limits, the usual ranges only.
    assert _engine(tmp_path / "free", Sharing(shared=True)).validate({**ok, "num_inference_steps": 50})


def test_the_page_states_the_limits_and_its_sliders_end_at_them(tmp_path):
    import gradio as gr

    from app.controls import build_prompt_bar
    from app.visitors import apply_limits

    engine = types.SimpleNamespace(sharing=Sharing(shared=True, limits=Limits(max_pixels=2 ** 20, max_steps=30,
                                                                             max_batch=2)))
    with gr.Blocks() as demo:
        build_prompt_bar("gen")
        steps = gr.Slider(1, 100, value=50, elem_id="gen-steps")
        images = gr.Slider(1, 8, value=1, elem_id="gen-num-images")
        area = gr.Slider(0.01, 4.0, value=1.0, elem_id="edit-megapixels")
    apply_limits(demo, engine)
    line = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "gen-limits")
    assert line.visible and line.value == "This studio allows up to 1 MP, 30 steps, 2 images per job."
    assert (steps.maximum, steps.value, images.maximum, area.maximum) == (30, 30, 2, 1.0)
    with gr.Blocks() as plain:
        build_prompt_bar("gen")
    apply_limits(plain, types.SimpleNamespace(sharing=Sharing()))
    assert not next(b for b in plain.blocks.values() if getattr(b, "elem_id", None) == "gen-limits").visible


def test_what_applies_to_everyones_jobs_is_not_changed_from_a_shared_page(tmp_path):
    """The VRAM limit and the speed settings apply to every visitor's jobs: a shared studio refuses them from the
    page (and the tab shows them read-only); one person's studio changes them as before."""
    shared = _engine(tmp_path / "shared", Sharing(shared=True))
    for change in (lambda: shared.set_vram_limit(4), lambda: shared.set_acceleration(step_cache=0.1)):
        with pytest.raises(EngineError, match="shared studio, so it is set by whoever starts it"):
            change()
    assert shared.speed_settings()["step_cache"] == 0 and shared.vram_limit is None
    mine = _engine(tmp_path / "mine")
    assert mine.set_acceleration(step_cache=0.1)["step_cache"] == 0.1
    from tabs.settings import is_shared
    assert is_shared(shared) and not is_shared(mine)
