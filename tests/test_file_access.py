"""Paths in requests: the attacks of issue 12 as tests (studio.file_access, studio.engine, studio.training).

A request may name a file only inside the folders the person chose (models, outputs, the web app's uploads,
--allow-dir); anything else is refused with one message, the same whether or not the file exists, and nothing is
read, copied or written. Checked on the engine's methods (every method that takes a path is guarded: a structural
test keeps it so) and through the served studio's HTTP API (the calls the page makes).
"""
from __future__ import annotations

import inspect
import os
import pathlib

import pytest
from PIL import Image

from engine.errors import EngineError
from studio.file_access import FileAccess
from tests.helpers import linked_models
from tests.test_app_client import DEMO, running_studio

REFUSED = "is not a file the studio may read"


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    """A PNG on the server, outside every folder the studio may read."""
    folder = tmp_path_factory.mktemp("server-private")
    path = folder / "secret.png"
    Image.new("RGB", (96, 96), (200, 10, 10)).save(path)
    return path


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("guarded")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs")


def _files_under(folder: pathlib.Path) -> set:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(EngineError) as caught:
        fn(*args, **kwargs)
    assert REFUSED in str(caught.value), str(caught.value)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------- the rule
def test_only_files_inside_the_chosen_folders(tmp_path):
    inside, outside = tmp_path / "allowed", tmp_path / "other"
    inside.mkdir(), outside.mkdir()
    (inside / "a.png").write_bytes(b"x")
    (outside / "b.png").write_bytes(b"x")
    (inside / "link.png").symlink_to(outside / "b.png")           # a link out of the folder
    (inside / "dir").symlink_to(outside)
    access = FileAccess([inside])
    assert access.check(inside / "a.png") == (inside / "a.png").resolve()
    assert access.contains(str(inside / "not-yet.png"))            # inside: the caller then says "not found"
    for bad in (outside / "b.png", inside / "link.png", inside / "dir" / "b.png", f"{inside}/../other/b.png",
                "/etc/passwd", "", f"{inside}/a.png\x00.txt", "x" * 5000, None, 42, {"path": str(inside)}):
        assert not access.contains(bad), bad
    # The same words whether the file exists or not: a refusal tells nothing about the server's files.
    there = _refusal(access.check, outside / "b.png", "the image")
    assert _refusal(access.check, outside / "missing.png", "the image") == there
    assert str(outside) not in there


def test_every_engine_method_taking_a_path_is_guarded():
    """A method added later with a path parameter and no guard fails here (names as the engine spells them)."""
    from studio.engine import Engine
    from studio.training import TrainingJobs
    pathlike = ("path", "_path", "files", "folder", "run_dir", "kept", "image")
    explicit = {"Engine.validate", "Engine.generate", "Engine.eligen_layout", "TrainingJobs.prepare_dataset",
                "TrainingJobs.read_dataset", "TrainingJobs.caption_changes", "TrainingJobs.save_captions",
                "TrainingJobs.resume", "TrainingJobs.show", "TrainingJobs.draft_captions",
                "TrainingJobs.try_checkpoint"}            # check inside (tested below)
    unguarded = []
    for cls in (Engine, TrainingJobs):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_"):
                continue
            params = [p for p in inspect.signature(fn).parameters if p != "self"]
            if any(p == k or p.endswith(k) or p.startswith(k) for p in params for k in pathlike):
                guarded = getattr(fn, "checked_paths", None) or f"{cls.__name__}.{name}" in explicit
                if not guarded:
                    unguarded.append(f"{cls.__name__}.{name}")
    assert not unguarded, f"methods taking paths without the file guard: {unguarded}"


# ------------------------------------------------------------------------------------------------- the engine
def test_requests_naming_outside_files_are_refused_before_anything_is_read(engine, secret):
    before = _files_under(engine.outputs_dir)
    cases = [
        {"controls": [{"image": str(secret), "preprocessor": "canny"}]},
        {"inpaint_image": str(secret), "inpaint_mask": str(secret)},
        {"kontext_images": [str(secret)], "variant": "FLUX.1-Kontext-dev-random-demo"},
        {"eligen_entity_prompts": ["a"], "eligen_entity_masks": [str(secret)]},
        {"eligen_entity_prompts": ["a"], "eligen_entity_masks": [None], "input_image": str(secret),
         "eligen_enable_inpaint": True},
    ]
    for case in cases:
        request = {"variant": DEMO, "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1, **case}
        message = _refusal(engine.generate, request)
        missing = {k: ([{**v[0], "image": str(secret) + ".gone"}] if k == "controls" else
                       [str(secret) + ".gone"] if isinstance(v, list) and v and v[0] == str(secret) else
                       str(secret) + ".gone" if v == str(secret) else v) for k, v in case.items()}
        assert _refusal(engine.generate, {**request, **missing}) == message
    assert _files_under(engine.outputs_dir) == before          # nothing copied beside a result


def test_page_helpers_refuse_outside_files(engine, secret):
    s = str(secret)
    calls = [
        (engine.edit_size, (s,)), (engine.inpaint_size, (s,)), (engine.mask_preview, (s,)),
        (engine.outpaint_canvas, (s,), {"left": 16}), (engine.preview_control, (s, "canny")),
        (engine.eligen_canvas, (64, 64, s)), (engine.eligen_layout, (s,)),
        (engine.eligen_layout, (engine.eligen_canvas(64, 64)["image"],), {"kept": {"masks": [s]}}),
        (engine.eligen_save_layout, (64, 64, "p", ["a"], [s])), (engine.eligen_load_layout, (s,)),
        (engine.eligen_restore, (s,)), (engine.read_recipe, (s,)), (engine.restore_inputs, (s,)),
    ]
    for fn, args, *kw in calls:
        _refusal(fn, *args, **(kw[0] if kw else {}))


def test_training_reads_and_writes_only_inside_the_chosen_folders(engine, secret, tmp_path):
    jobs = engine.training
    outside = secret.parent
    (outside / "secret.txt").write_text("private words")
    # Listing a server folder (the Load button with "/usr"): refused without listing it.
    for folder in ("/usr", str(outside), str(engine.models_dir / ".." / "..")):
        _refusal(jobs.read_dataset, folder)
    _refusal(jobs.prepare_dataset, [secret])
    # Caption files are never written outside: not through save_captions, not through a start.
    _refusal(jobs.save_captions, outside, [["secret.png", "overwritten"]])
    with pytest.raises(EngineError):
        jobs.start({"base_model": DEMO, "dataset": str(outside), "captions": [["secret.png", "overwritten"]],
                    "steps": 2})
    assert (outside / "secret.txt").read_text() == "private words"
    # A metadata file inside may not point at images outside.
    inside = engine.outputs_dir / "meta-set"
    inside.mkdir(parents=True, exist_ok=True)
    (inside / "meta.csv").write_text(f"image,prompt\n{secret},x\n../../{secret.parent.name}/secret.png,y\n")
    _refusal(jobs.read_dataset, inside / "meta.csv")
    # Runs: only this studio's run folders can be resumed or viewed.
    run = outside / "fake-run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    for fn in (jobs.resume, jobs.show):
        with pytest.raises(EngineError, match="not one of this studio's training runs"):
            fn(str(run))
    # A checkpoint to try in Generate comes from one of those runs only; captions are drafted inside the folders.
    (run / "step-2.safetensors").write_bytes(b"not a LoRA")
    with pytest.raises(EngineError, match="not one of this studio's training runs"):
        jobs.try_checkpoint(str(run / "step-2.safetensors"))
    _refusal(jobs.draft_captions, outside, [["secret.png", ""]])


def test_a_refused_start_writes_no_caption(engine, tmp_path):
    """The whole form is checked before the table's captions are written into the dataset."""
    ds = engine.training.prepare_dataset([_photo(engine.outputs_dir / "up" / "cat.png")], {"cat.png": "first"})
    txt = pathlib.Path(ds["folder"]) / "cat.txt"
    with pytest.raises(EngineError, match="LoRA rank"):
        engine.training.start({"base_model": DEMO, "dataset": ds["folder"], "captions": [["cat.png", "changed"]],
                               "steps": 2, "lora_rank": 0})
    assert txt.read_text() == "first"


def _photo(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (80, 64), (10, 120, 30)).save(path)
    return path


# ------------------------------------------------------------------------------------------------- the served studio
@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    return running_studio(tmp_path_factory, request)


def test_inpaint_api_cannot_read_a_server_file(served, secret):
    """The attack: /inpaint's controls are plain JSON, so Gradio's upload check never sees the path."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served.url, verbose=False)
    before = _files_under(served.outputs)
    messages = []
    for path in (str(secret), str(secret.with_name("nothing-here.png"))):
        with pytest.raises(AppError) as caught:
            client.predict(None, DEMO, "x", "", 2, 3.5, 1.0, 1, 1, False, 0,
                           [{"image": path, "preprocessor": "none", "controlnet": "Union-alpha", "scale": 1.0,
                             "start": 0.0, "end": 1.0}], api_name="/inpaint")
        messages.append(str(caught.value))
    assert REFUSED in messages[0] and messages[0] == messages[1]
    assert "Traceback" not in messages[0] and "Pillow" not in messages[0]
    assert _files_under(served.outputs) == before         # nothing copied where /gradio_api/file= would serve it


def test_work_folder_is_per_engine_cleaned_and_bounded(tmp_path):
    from studio.work_files import WorkFolder
    outputs = tmp_path / "outputs"
    dead = outputs / ".work" / "999999999-deadbeef"       # a studio process that is gone
    dead.mkdir(parents=True)
    (dead / "old.png").write_bytes(b"x")
    alive = outputs / ".work" / f"{os.getppid()}-cafe0000"   # a studio still running beside us
    alive.mkdir()
    (alive / "theirs.png").write_bytes(b"x")
    (outputs / ".work" / "loose.png").write_bytes(b"x")   # an older version's file
    work = WorkFolder(outputs, max_files=5)
    assert not dead.exists() and (alive / "theirs.png").exists() and not (outputs / ".work" / "loose.png").exists()
    made = [work.save(Image.new("L", (8, 8), k), "mask") for k in range(9)]
    left = sorted(work.path.iterdir())
    assert len(left) == 5 and set(left) <= set(made)
    # A plain canvas is one file per size, reused: opening the page again adds nothing.
    first = work.keep(Image.new("RGB", (64, 64)), "canvas-64x64.png")
    assert work.keep(Image.new("RGB", (64, 64)), "canvas-64x64.png") == first


def test_engine_start_leaves_no_stale_work_and_the_eligen_canvas_is_reused(engine):
    a = engine.eligen_canvas(128, 128)["image"]
    b = engine.eligen_canvas(128, 128)["image"]
    assert a == b and pathlib.Path(a).is_relative_to(engine.work.path)


def test_any_value_in_any_setting_is_a_message_never_a_crash(engine):
    """What an API client can send: each request key with values of the wrong kind gives the engine's message."""
    from studio.engine import REQUEST_DEFAULTS
    odd = [5, -1, 1e308, float("nan"), "x" * 5000, "a\x00b", {"a": 1}, [1, [2]], [{"image": 3}], True, [None],
           ["", None], {"image": "x"}]
    crashes = []
    for key in [*REQUEST_DEFAULTS, "variant"]:
        for value in odd:
            try:
                engine.validate({"variant": DEMO, "prompt": "x", key: value})
            except EngineError:
                pass
            except Exception as exc:  # noqa: BLE001 - collected: any other exception is the bug
                crashes.append(f"{key}={value!r:.30}: {type(exc).__name__}: {exc}")
    assert not crashes, "\n".join(crashes)


def test_events_missing_from_the_api_page_are_guarded_too(served):
    """The Train tab's dataset Load is a private event (no API name a client library calls), but the page calls it
    by number, and so can anyone: listing a server folder through it is refused like everything else."""
    import json
    import uuid

    import httpx

    config = httpx.get(f"{served.url}config", timeout=30).json()
    loads = [d["id"] for d in config["dependencies"] if d.get("api_name") in ("on_load", "on_load_1")]
    assert loads, "the Train tab's dataset Load event is gone"
    session = f"private-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=f"{served.url}gradio_api", timeout=30) as http:
        http.post("/queue/join", json={"data": ["/usr"], "fn_index": loads[0], "session_hash": session,
                                       "event_data": None, "trigger_id": None}).raise_for_status()
        with http.stream("GET", "/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "process_completed":
                    break
    assert msg["success"] is False
    text = json.dumps(msg["output"])
    assert REFUSED in text and "/usr/" not in text and "bin" not in text.split(REFUSED)[0]
