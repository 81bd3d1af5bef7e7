"""The Hugging Face Space entry: the README's front matter, launch.py under a Space's environment (GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT, SPACE_ID: the Hub cache as models folder, training off) and the ZeroGPU path (``studio.zerogpu``
through ``spaces.GPU``) on the CPU.

What cannot run here: spaces' own ZeroGPU path (SPACES_ZERO_GPU=true needs the Space's device API and a GPU; off it
``spaces.GPU`` returns the function as it is). What it would do is imitated: the job's arguments pickled to a forked
worker that inherited the engine, its progress and cancel through ``zerogpu.Channel``.
"""
from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import pathlib
import pickle
import posixpath
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import yaml

from engine import registry
from engine.errors import EngineError, JobCancelled
from studio import space, zerogpu
from studio.catalogue import Catalogue

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT = "FLUX.1-dev"          # the studio's default when its files are there (the first of the catalogue)
SMALL = {"variant": "FLUX.1-dev-random-demo", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 7}
SPACE_COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


def front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md must open with the Space's front matter between --- lines"
    return yaml.safe_load(text.split("---\n", 2)[1])


def preloaded(meta: dict) -> dict:
    """preload_from_hub as {model_id: [file, ...]} ("repo file1,file2" per entry)."""
    out = {}
    for entry in meta["preload_from_hub"]:
        repo, _, files = str(entry).partition(" ")
        out[repo] = [f for f in files.split(",") if f]
    return out


def spec_matches(spec, file: str) -> bool:
    return file.startswith(spec.pattern) if spec.pattern.endswith("/") else fnmatch.fnmatch(file, spec.pattern)


def read_beside(spec, file: str) -> bool:
    """A file the loader reads beside a spec's weights (engine.loading.files: the folder's config.json, a shard
    index)."""
    folder = posixpath.dirname(spec.pattern)
    return bool(folder) and posixpath.dirname(file) == folder and (
        file.endswith("/config.json") or file.endswith(".safetensors.index.json"))


def fake_hub_cache(cache: pathlib.Path, model_id: str, source: pathlib.Path | dict, revision: str) -> pathlib.Path:
    """A Hub cache entry as huggingface_hub lays it out: blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>,
    refs/main = <rev>. ``source``: a folder to copy, or {file: bytes}."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    files = ({p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
             if isinstance(source, pathlib.Path) else source)
    snapshot = repo / "snapshots" / revision
    for n, (name, data) in enumerate(sorted(files.items())):
        blob = repo / "blobs" / f"{revision}-{n}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# ------------------------------------------------------------------------------------------------ front matter
def test_front_matter_is_a_gradio_space_of_this_repository():
    meta = front_matter()
    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "python_version", "app_file",
                "suggested_hardware", "models", "preload_from_hub", "short_description"):
        assert meta.get(key), f"front matter lacks {key}"
    pins = dict(line.strip().split("==", 1) for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert meta["sdk"] == "gradio" and str(meta["sdk_version"]) == pins["gradio"]
    assert "spaces" in pins                                   # ZeroGPU's package, the version the tests ran
    app = REPO / meta["app_file"]
    assert app.is_file() and 'if __name__ == "__main__":' in app.read_text()      # Spaces run python <app_file>
    assert str(meta["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    from huggingface_hub import SpaceHardware
    assert meta["suggested_hardware"] == SpaceHardware.ZERO_A10G.value      # ZeroGPU's flavour name
    assert len(meta["short_description"]) <= 60
    assert {meta["colorFrom"], meta["colorTo"]} <= SPACE_COLOURS
    variant = registry.get_variant(DEFAULT)
    assert {f.model_id for f in variant.files} <= set(meta["models"])


def test_preloaded_files_are_the_default_models_files_and_load_from_the_hub_cache(tmp_path, manifests_dir):
    wanted = preloaded(front_matter())
    variant = registry.get_variant(DEFAULT)
    for model_id, files in wanted.items():
        specs = [f for f in variant.files if f.model_id == model_id]
        assert specs, f"preload_from_hub names {model_id}, which {DEFAULT} does not read"
        for file in files:
            assert any(spec_matches(s, file) or read_beside(s, file) for s in specs), \
                f"{model_id}/{file} is no file of {DEFAULT}"
    # What the official repository holds for each role (the checkpoint manifests) is all preloaded.
    official = [f for entry in json.loads((manifests_dir / "index.json").read_text())
                if entry["repo"] in wanted for f in entry["files"]]
    read = [f for f in official if any(spec_matches(s, f) or read_beside(s, f) for s in variant.files)]
    assert read and set(read) <= set(wanted[registry.FLUX_DEV])
    # Laid out as the Space's build lays them out, the studio finds them and makes FLUX.1-dev its default.
    cache = tmp_path / "hf" / "hub"
    for model_id, files in wanted.items():
        fake_hub_cache(cache, model_id, {f: b"" for f in files}, "rev1")
    view = space.space_models_dir({"HF_HOME": str(tmp_path / "hf")})
    assert view == tmp_path / "hf" / space.VIEW_FOLDER and (view / registry.FLUX_DEV).is_symlink()
    catalogue = Catalogue(view)
    assert catalogue.available(variant) and catalogue.default_variant() == DEFAULT


def test_the_links_follow_the_cache(tmp_path):
    cache, view = tmp_path / "hub", tmp_path / "view"
    first = fake_hub_cache(cache, "org/model", {"a.safetensors": b"1"}, "rev1")
    assert space.link_hub_cache(cache, view) == {"org/model": first}
    second = fake_hub_cache(cache, "org/model", {"a.safetensors": b"2"}, "rev2")    # a new revision: refs/main moves
    assert space.link_hub_cache(cache, view) == {"org/model": second}
    assert (view / "org/model/a.safetensors").read_bytes() == b"2"
    (view / "mine" / "own").mkdir(parents=True)                 # a real folder there (downloads, the demo) stays
    fake_hub_cache(cache, "mine/own", {"b.json": b"{}"}, "rev1")
    assert "mine/own" not in space.link_hub_cache(cache, view) and not (view / "mine/own").is_symlink()
    assert space.link_hub_cache(tmp_path / "nothing", view) == {}


def test_space_settings_from_the_environment():
    assert space.server_defaults({}) == ("127.0.0.1", 7860)
    assert space.server_defaults({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}) == ("0.0.0.0", 7861)
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT='http' is not a port number"):
        space.server_defaults({"GRADIO_SERVER_PORT": "http"})
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT='99999' is not a port number"):
        space.server_defaults({"GRADIO_SERVER_PORT": "99999"})
    assert space.training_enabled({}) and not space.training_enabled({"SPACE_ID": "me/studio"})
    assert space.training_enabled({"SPACE_ID": "me/studio", space.TRAINING_ENV: "1"})
    assert not space.training_enabled({"SPACE_ID": "me/s", space.TRAINING_ENV: "1", "SPACES_ZERO_GPU": "true"})
    assert space.space_host_names({"SPACE_ID": "me/s", "SPACE_HOST": "me-s.hf.space"}) == ["me-s.hf.space"]
    assert space.space_host_names({"SPACE_HOST": "me-s.hf.space"}) == []
    assert space.hub_cache({"HF_HUB_CACHE": "/x/hub", "HF_HOME": "/y"}) == pathlib.Path("/x/hub")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_app_starts_as_a_space(tmp_path):
    """launch.py as a Space starts it: where GRADIO_SERVER_* say, the Space's host name answered, models from the Hub
    cache's links folder, and the Train tab saying why training is off."""
    port = free_port()
    env = {**os.environ, "SPACE_ID": "someone/flux-studio", "SPACE_HOST": "someone-flux-studio.hf.space",
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("SPACES_ZERO_GPU", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--demo", "--outputs-dir", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline, status = f"http://127.0.0.1:{port}/", time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _ = get(url)
                break
            except OSError:
                time.sleep(0.3)
        assert status == 200, f"no page on {url}: {proc.poll()=}"
        assert get(url, host="someone-flux-studio.hf.space")[0] == 200
        assert get(url, host="elsewhere.example")[0] == 421
        ids = {c.get("props", {}).get("elem_id") for c in json.loads(get(url + "config")[1])["components"]}
        assert "tab-train-off" in ids and "train-off-note" in ids and "tab-train" not in ids
        assert (tmp_path / "hf" / space.VIEW_FOLDER).is_dir()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert f"running at http://127.0.0.1:{port}/" in out, out
    assert str(tmp_path / "hf" / space.VIEW_FOLDER) in out, out      # the models folder it names


# -------------------------------------------------------------------------------------------------- ZeroGPU
def job(steps=28, width=1024, height=1024, images=1, cfg=1.0, variant=DEFAULT, hires=None):
    states = {"hires": types.SimpleNamespace(hires_scale=hires)} if hires else {}
    return types.SimpleNamespace(variant=registry.get_variant(variant), width=width, height=height, states=states,
                                 settings=types.SimpleNamespace(num_inference_steps=steps, num_images=images,
                                                                cfg_scale=cfg))


def test_the_gpu_time_follows_the_job():
    base = zerogpu.job_seconds(job())
    assert zerogpu.MIN_SECONDS < base < zerogpu.MAX_SECONDS
    assert zerogpu.job_seconds(job(steps=14)) < base < zerogpu.job_seconds(job(steps=40))
    assert zerogpu.job_seconds(job(width=512, height=512)) < base < zerogpu.job_seconds(job(width=1280, height=1280))
    assert base < zerogpu.job_seconds(job(images=2)) and base < zerogpu.job_seconds(job(cfg=3.5))
    assert base < zerogpu.job_seconds(job(hires=1.5))
    assert zerogpu.job_seconds(job(variant="FLUX.1-schnell", steps=4)) == zerogpu.MIN_SECONDS      # the floor
    assert zerogpu.job_seconds(job(steps=50, images=4, cfg=4, width=1536)) == zerogpu.MAX_SECONDS    # the ceiling
    assert zerogpu.job_seconds(job(variant="FLUX.2-dev")) > base
    assert zerogpu.job_seconds(job(variant="FLUX.1-dev-random-demo", steps=8)) == zerogpu.MIN_SECONDS


@pytest.fixture(scope="module")
def space_engine(demo_dir, tmp_path_factory):
    """A studio engine whose models folder is the links folder over a Hub cache holding the demo model (as a Space
    whose build preloaded it), its jobs routed through ``zerogpu`` as on a ZeroGPU Space."""
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("space")
    fake_hub_cache(root / "hf" / "hub", registry.DEMO_ID, demo_dir, "demo1")
    models = space.space_models_dir({"HF_HOME": str(root / "hf")})
    engine = Engine(models_dir=models, outputs_dir=root / "out")
    assert engine.default_variant() == SMALL["variant"]       # found through the links
    zerogpu.install(engine)
    yield engine
    zerogpu.uninstall()


def test_spaces_gpu_is_the_function_itself_off_zerogpu(monkeypatch):
    monkeypatch.delenv("ZEROGPU_MMAP_AUTOPRUNE_PATTERN", raising=False)
    zerogpu.import_spaces()           # keeps the model files unless the Space's owner says otherwise
    assert os.environ["ZEROGPU_MMAP_AUTOPRUNE_PATTERN"] == zerogpu.KEEP_MODEL_FILES
    import spaces
    assert not space.zero_gpu()
    assert spaces.GPU(duration=zerogpu.job_seconds)(zerogpu.gpu_job) is zerogpu.gpu_job


def test_a_job_runs_through_the_gpu_function(space_engine):
    seen = []
    previews = []
    results = space_engine.generate({**SMALL, "prompt": "a lighthouse"}, preview=previews.append,
                                    progress=lambda d, t, m: seen.append((d, t, threading.current_thread().name)))
    assert zerogpu.installed() and len(results) == 1
    path = pathlib.Path(results[0]["path"])
    assert path.is_file() and path.stat().st_size > 0
    assert results[0]["recipe"]["model_files"]["dit"][0]["file"].endswith("flux1-dev.safetensors")
    assert (3, 3, "flux-studio-zerogpu-relay") in seen        # the steps came back through the channel
    assert all(pathlib.Path(p).is_file() for p in previews)
    # What crosses to spaces' worker and back is pickled: the validated job and the results.
    valid = space_engine.validate({**SMALL, "prompt": "a lighthouse"})
    assert pickle.loads(pickle.dumps(valid)).settings == valid.settings
    assert pickle.loads(pickle.dumps(results))[0]["path"] == results[0]["path"]


def test_a_cancel_reaches_the_gpu_function(space_engine, tmp_path):
    valid = space_engine.validate({**SMALL, "prompt": "cancelled"})

    def cancelled():
        raise JobCancelled("Cancelled; memory released.")
    with pytest.raises(JobCancelled):
        zerogpu.run_job(space_engine, valid, tmp_path, lambda *a: None, cancelled)
    assert not list(tmp_path.rglob("*.png"))


def test_only_the_model_loaded_at_start_runs(space_engine, tmp_path):
    assert zerogpu.preload(space_engine) == SMALL["variant"]       # what launch.py does on ZeroGPU
    assert space_engine.models.pipe_variant == SMALL["variant"]
    zerogpu.check_variant(registry.get_variant("FLUX.1-Kontext-dev-random-demo"))   # a tiny demo: fine
    with pytest.raises(EngineError, match="This ZeroGPU Space runs FLUX.1-dev-random-demo only"):
        zerogpu.run_job(space_engine, types.SimpleNamespace(variant=registry.get_variant("FLUX.1-schnell")), tmp_path,
                        lambda *a: None, lambda: None)


def test_compile_is_refused_on_zerogpu(space_engine):
    from engine.acceleration.settings import SettingError
    with pytest.raises(SettingError, match="torch.compile is off on a ZeroGPU Space"):
        space_engine.set_acceleration(compile=True)
    assert space_engine.set_acceleration(compile=False, step_cache=0.0)["compile"] is False


def test_the_gpu_function_in_a_forked_worker(space_engine, tmp_path):
    """As spaces runs it on ZeroGPU: a forked process that inherited the engine gets the arguments pickled, sends
    progress through the channel made before the fork, sees a cancel set after the fork, answers pickled."""
    context = multiprocessing.get_context("fork")
    arguments, answers = context.Queue(), context.Queue()
    channel = zerogpu.installed_channel()      # made by install, before any fork

    def worker():
        answers.put(zerogpu.gpu_job(*arguments.get()))

    valid = space_engine.validate({**SMALL, "prompt": "in a worker", "num_images": 2})
    seen, done = [], threading.Event()
    process = context.Process(target=worker, daemon=True)
    process.start()
    relay = threading.Thread(target=channel.relay, args=(41, lambda *a: seen.append(a), None, lambda: None, done))
    relay.start()
    arguments.put((valid, str(tmp_path / "a"), 41, False))
    outcome = answers.get(timeout=60)
    assert "results" in outcome, outcome
    done.set()
    relay.join()
    assert [pathlib.Path(r["path"]).is_file() for r in outcome["results"]] == [True, True]
    assert (6, 6, "Image 2/2, step 3/3") in seen
    # A cancel set here after the fork stops the next call in the worker at its first step.
    process = context.Process(target=worker, daemon=True)
    process.start()
    channel.cancel.set()
    arguments.put((valid, str(tmp_path / "b"), 42, False))
    assert answers.get(timeout=60) == {"cancelled": "Cancelled; memory released."}
    channel.cancel.clear()
    process.join(10)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").rglob("*.png"))


def test_the_relay_outlives_a_failing_callback():
    channel, done, seen = zerogpu.Channel(), threading.Event(), []

    def progress(*step):
        seen.append(step)
        if len(seen) == 1:
            raise RuntimeError("a page that went away")
    for k in (1, 2):
        channel.send(5, "progress", (k, 2, f"step {k}/2"))
    channel.send(4, "progress", (9, 9, "an earlier call's"))
    done.set()
    channel.relay(5, progress, None, lambda: None, done)
    assert seen == [(1, 2, "step 1/2"), (2, 2, "step 2/2")] and not channel.cancel.is_set()
