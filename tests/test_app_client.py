"""The studio served in-process with the real engine's demo model, driven through gradio_client's /generate.

``running_studio`` starts one server per test session; the browser tests use the same one.
"""
from __future__ import annotations

import socket
import threading
import time
import types

import pytest
from PIL import Image

from engine import recipe as R

DEMO = "FLUX.1-dev-random-demo"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", None}

_studio: dict = {}
_studio_lock = threading.Lock()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NetworkRecorder:
    """Records every host name looked up and every address connected to while active."""

    def __init__(self):
        self.hosts: list = []
        self._orig_getaddrinfo = socket.getaddrinfo
        self._orig_connect = socket.socket.connect
        self._orig_connect_ex = socket.socket.connect_ex

    def __enter__(self):
        recorder = self

        def getaddrinfo(host, *args, **kwargs):
            recorder.hosts.append(host.decode() if isinstance(host, bytes) else host)
            return recorder._orig_getaddrinfo(host, *args, **kwargs)

        def connect(sock, address):
            if isinstance(address, tuple):
                recorder.hosts.append(address[0])
            return recorder._orig_connect(sock, address)

        def connect_ex(sock, address):
            if isinstance(address, tuple):
                recorder.hosts.append(address[0])
            return recorder._orig_connect_ex(sock, address)

        socket.getaddrinfo = getaddrinfo
        socket.socket.connect = connect
        socket.socket.connect_ex = connect_ex
        return self

    def __exit__(self, *exc):
        socket.getaddrinfo = self._orig_getaddrinfo
        socket.socket.connect = self._orig_connect
        socket.socket.connect_ex = self._orig_connect_ex


def running_studio(tmp_path_factory, request):
    """The session's studio: the real engine with the demo model, served on a free 127.0.0.1 port."""
    with _studio_lock:
        if "server" in _studio:
            return _studio["server"]
        from app.studio import launch_studio
        from engine import configure_engine

        root = tmp_path_factory.mktemp("studio")
        with _NetworkRecorder() as recorder:
            engine = configure_engine(models_dir=root / "models", demo=True, outputs_dir=root / "outputs")
            demo = launch_studio(engine, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
        server = types.SimpleNamespace(url=demo.local_url, engine=engine, demo=demo, outputs=root / "outputs",
                                       startup_hosts=list(recorder.hosts))
        _studio["server"] = server
        request.addfinalizer(demo.close)
        return server


@pytest.fixture(scope="session")
def studio(tmp_path_factory, request):
    return running_studio(tmp_path_factory, request)


@pytest.fixture(scope="session")
def client(studio, tmp_path_factory):
    from gradio_client import Client

    return Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("client-downloads")))


def _generate(client, **overrides):
    args = {
        "variant": DEMO, "prompt": "a red cube on a table", "negative_prompt": "", "width": 64, "height": 64,
        "num_inference_steps": 2, "embedded_guidance": 3.5, "cfg_scale": 1.0, "seed": 1234, "num_images": 1,
    }
    args.update(overrides)
    return client.predict(*args.values(), api_name="/generate")


def _pngs(folder):
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def test_startup_contacts_no_outside_host(studio):
    outside = [h for h in studio.startup_hosts if h not in LOCAL_HOSTS]
    assert not outside, f"starting the studio contacted {outside}"
    assert studio.url.startswith("http://127.0.0.1:")


def test_generate_endpoint_returns_png_with_recipe(client, studio):
    images, info, seed = _generate(client, width=96, height=64, seed=1234, prompt="a red cube on a table")
    assert len(images) == 1
    path = images[0]["image"]
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (96, 64)
    recipe = R.read_recipe(path)  # the downloaded file still carries our JSON chunk
    assert recipe["variant"] == DEMO
    assert recipe["prompt"] == "a red cube on a table"
    assert recipe["seed"] == 1234 and seed == 1234
    assert (recipe["width"], recipe["height"]) == (96, 64)
    assert recipe["num_inference_steps"] == 2
    assert "Seed: 1234" in info and "Size: 96x64" in info
    # The same file was saved under the engine's outputs folder.
    assert any(R.read_recipe(p) == recipe for p in _pngs(studio.outputs))


def test_size_is_rounded_up_to_16_and_reported(client):
    images, info, _ = _generate(client, width=100, height=72, seed=5)
    with Image.open(images[0]["image"]) as im:
        assert im.size == (112, 80)
    assert "Size: 112x80" in info
    assert "rounded up to 112x80" in info


def test_batch_seeds_follow_the_first(client):
    images, _, seed = _generate(client, seed=77, num_images=2)
    assert seed == 77
    assert [R.read_recipe(item["image"])["seed"] for item in images] == [77, 78]
    assert [item["caption"] for item in images] == ["seed 77", "seed 78"]


def test_random_seed_is_reported(client):
    images, info, seed = _generate(client, seed=-1)
    assert isinstance(seed, int) and seed >= 0
    assert R.read_recipe(images[0]["image"])["seed"] == seed
    assert f"Seed: {seed}," in info


def test_bad_size_gives_a_message_then_the_app_still_works(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        _generate(client, width=5000)
    message = str(caught.value)
    assert "5000" in message and "4096" in message
    assert "Traceback" not in message
    images, _, seed = _generate(client, seed=99)
    assert seed == 99 and len(images) == 1


def test_engine_error_is_a_message_then_the_app_still_works(client, monkeypatch):
    from gradio_client.exceptions import AppError

    # FLUX.1-dev's files are not in the (temporary) models folder, and downloads are off: the engine's
    # EngineError must reach the client as its message, not a traceback or a generic "Error".
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    with pytest.raises(AppError) as caught:
        _generate(client, variant="FLUX.1-dev")
    message = str(caught.value)
    assert "flux1-dev.safetensors" in message
    assert "Traceback" not in message
    images, _, seed = _generate(client, seed=100)
    assert seed == 100 and len(images) == 1


def test_cancel_stops_a_running_job(client, studio):
    before = set(_pngs(studio.outputs))
    job = client.submit(DEMO, "a long job", "", 512, 512, 100, 3.5, 1.0, 3, 1, api_name="/generate")
    # Wait until the job is really denoising (progress reported), then cancel it.
    deadline = time.time() + 60
    while time.time() < deadline:
        status = job.status()
        if status.progress_data and any((unit.index or 0) >= 1 and unit.unit == "steps"
                                        for unit in status.progress_data):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the job never reported a denoising step")
    started = time.time()
    client.predict(api_name="/cancel")
    images, info, seed = job.result(timeout=30)
    assert time.time() - started < 15  # stops at the next step, not after 100 steps
    assert images == [] and info == "Cancelled." and seed is None
    assert set(_pngs(studio.outputs)) == before  # nothing saved for the cancelled image
    # The engine is usable right after.
    images, _, seed = _generate(client, seed=4)
    assert seed == 4 and len(images) == 1


def test_restore_keeps_values_in_range_and_unknown_models_out():
    from app.widgets import RESTORE_KEYS, restore_updates

    recipe = {"variant": "SDXL", "prompt": "p", "width": 8192, "height": 32, "num_inference_steps": 150,
              "cfg_scale": 7, "seed": 3}
    limits = {"width": (64, 4096), "height": (64, 4096), "num_inference_steps": (1, 100), "cfg_scale": (1, 10)}
    updates = dict(zip(RESTORE_KEYS, restore_updates(recipe, ["FLUX.1-dev"], RESTORE_KEYS, limits)))
    assert "value" not in updates["variant"]  # a model this studio does not offer: left as it is
    assert updates["prompt"]["value"] == "p"
    assert updates["width"]["value"] == 4096 and updates["height"]["value"] == 64
    assert updates["num_inference_steps"]["value"] == 100
    assert updates["cfg_scale"]["value"] == 7.0 and updates["seed"]["value"] == 3
    assert "value" not in updates["embedded_guidance"] and "value" not in updates["negative_prompt"]
    known = dict(zip(RESTORE_KEYS, restore_updates({"variant": "FLUX.1-dev"}, ["FLUX.1-dev"])))
    assert known["variant"]["value"] == "FLUX.1-dev"
