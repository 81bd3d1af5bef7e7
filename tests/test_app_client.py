"""The studio served in-process with the real engine's demo model, driven through gradio_client's /generate.

``running_studio`` starts one server per test session; the browser tests use the same one. Its models folder holds
a small diffusers/PEFT LoRA for the demo transformer (``loras/demo-style.safetensors``).
"""
from __future__ import annotations

import json
import pathlib
import socket
import threading
import time
import types

import pytest
from PIL import Image

from studio import recipes as R

DEMO = "FLUX.1-dev-random-demo"
DEMO_LORA = "demo-style.safetensors"
PLAN_STRATEGIES = {"resident", "offload", "fp8", "fp8+offload", "stream"}
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


def write_demo_lora(path, rank: int = 4, seed: int = 0, scale: float = 0.5) -> pathlib.Path:
    """A diffusers/PEFT-format LoRA for the demo transformer (hidden 64; 2 double and 2 single blocks): q, k, v of
    every attention, with up matrices large enough to change the image."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "add_q_proj")]
    targets += [f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v")]
    for target in targets:
        tensors[f"transformer.{target}.lora_A.weight"] = torch.randn(rank, 64, generator=gen) * scale
        tensors[f"transformer.{target}.lora_B.weight"] = torch.randn(64, rank, generator=gen) * scale
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def running_studio(tmp_path_factory, request):
    """The session's studio: the real engine with the demo model, served on a free 127.0.0.1 port."""
    with _studio_lock:
        if "server" in _studio:
            return _studio["server"]
        from app.studio import launch_studio
        from studio import configure_engine

        root = tmp_path_factory.mktemp("studio")
        write_demo_lora(root / "models" / "loras" / DEMO_LORA)
        with _NetworkRecorder() as recorder:
            engine = configure_engine(models_dir=root / "models", demo=True, outputs_dir=root / "outputs")
            demo = launch_studio(engine, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
        server = types.SimpleNamespace(url=demo.local_url, engine=engine, demo=demo, outputs=root / "outputs",
                                       startup_hosts=list(recorder.hosts))
        _studio["server"] = server
        request.addfinalizer(demo.close)
        return server


@pytest.fixture(scope="session")
def client(studio, tmp_path_factory):
    from gradio_client import Client

    return Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("client-downloads")))


def _generate(client, **overrides):
    args = {
        "variant": DEMO, "prompt": "a red cube on a table", "negative_prompt": "", "width": 64, "height": 64,
        "num_inference_steps": 2, "embedded_guidance": 3.5, "cfg_scale": 1.0, "seed": 1234, "num_images": 1,
    }
    args.update(overrides)  # without "loras", the call is the older 10-input one (old clients keep working)
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
    from app.restore import RESTORE_KEYS, restore_updates

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


# ---------------------------------------------------------------------------------------------------------------
# LoRAs through /generate
# ---------------------------------------------------------------------------------------------------------------

def _pixels(path):
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_generate_with_a_lora(client, studio):
    plain, _, _ = _generate(client, seed=21)
    images, info, seed = _generate(client, seed=21, loras=json.dumps([{"name": DEMO_LORA, "weight": 0.8}]))
    recipe = R.read_recipe(images[0]["image"])
    assert seed == 21 and len(recipe["loras"]) == 1
    entry = recipe["loras"][0]
    assert entry["file"].endswith(DEMO_LORA) and entry["weight"] == 0.8
    assert "diffusers" in entry["format"].lower() or "peft" in entry["format"].lower()
    assert entry["fingerprint"]
    # The image info names the LoRA, its weight and format; the LoRA changed the image.
    assert "LoRAs:" in info and DEMO_LORA in info and "weight 0.8" in info
    assert _pixels(images[0]["image"]) != _pixels(plain[0]["image"])
    # Dropping the PNG into the image-info panel reads the LoRAs back for the picker to restore.
    from app.lora_picker import lora_restore_plan
    from app.restore import read_dropped

    text, settings = read_dropped(images[0]["image"], studio.engine)
    assert "LoRAs:" in text and DEMO_LORA in text
    chosen, weights, missing, changed = lora_restore_plan(settings["loras"], studio.engine.loras())
    assert chosen == [DEMO_LORA] and weights == {DEMO_LORA: 0.8} and not missing and not changed
    # [name, weight] pairs work too; the weight changes the image; no LoRA again gives the plain image back.
    half, _, _ = _generate(client, seed=21, loras=[[DEMO_LORA, 0.4]])
    assert R.read_recipe(half[0]["image"])["loras"][0]["weight"] == 0.4
    assert _pixels(half[0]["image"]) != _pixels(images[0]["image"])
    again, _, _ = _generate(client, seed=21, loras="")
    assert not R.read_recipe(again[0]["image"]).get("loras")
    assert _pixels(again[0]["image"]) == _pixels(plain[0]["image"])


def test_bad_loras_give_messages_then_the_app_still_works(client, studio):
    from gradio_client.exceptions import AppError

    # Keys that bind to nothing in a FLUX transformer: an error naming the file and the format found.
    import torch
    from safetensors.torch import save_file

    bad = pathlib.Path(studio.engine.models_dir) / "loras" / "not-flux.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(bad))
    try:
        with pytest.raises(AppError) as caught:
            _generate(client, loras=json.dumps([{"name": "not-flux.safetensors", "weight": 1}]))
        message = str(caught.value)
        assert "not-flux.safetensors" in message and "Traceback" not in message
        assert "kohya" in message.lower()
    finally:
        bad.unlink()
    with pytest.raises(AppError) as caught:  # a LoRA that is not in the folder
        _generate(client, loras=json.dumps([{"name": "nowhere.safetensors", "weight": 1}]))
    assert "nowhere.safetensors" in str(caught.value)
    with pytest.raises(AppError) as caught:  # not JSON
        _generate(client, loras="demo-style at 0.5")
    assert "JSON" in str(caught.value)
    images, _, seed = _generate(client, seed=101)
    assert seed == 101 and len(images) == 1


def test_lora_inputs_and_restore_matching():
    from app.lora_picker import lora_restore_plan, match_lora, parse_loras

    assert parse_loras("") == [] and parse_loras(None) == [] and parse_loras("[]") == []
    assert parse_loras('[{"name": "a.safetensors", "weight": 0.5}]') == [{"name": "a.safetensors", "weight": 0.5}]
    assert parse_loras([["a.safetensors", "1.5"], "b.safetensors"]) == [
        {"name": "a.safetensors", "weight": 1.5}, {"name": "b.safetensors", "weight": 1.0}]
    names = ["style/ink.safetensors", "detail.safetensors"]
    assert match_lora({"file": "loras/style/ink.safetensors"}, names) == "style/ink.safetensors"
    assert match_lora({"name": "style/ink.safetensors"}, names) == "style/ink.safetensors"
    assert match_lora({"file": "old/place/ink.safetensors"}, names) == "style/ink.safetensors"  # unique file name
    assert match_lora({"file": "loras/gone.safetensors"}, names) is None
    items = [{"name": n, "path": "/nonexistent/" + n} for n in names]
    chosen, weights, missing, _ = lora_restore_plan(
        [{"file": "loras/detail.safetensors", "weight": 0.25}, {"file": "loras/gone.safetensors", "weight": 1},
         {"file": "loras/style/ink.safetensors", "weight": 9}], items)
    assert chosen == ["detail.safetensors", "style/ink.safetensors"]
    assert weights == {"detail.safetensors": 0.25, "style/ink.safetensors": 2.0}  # kept in the slider's range
    assert missing == ["loras/gone.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------------------------------

def _check_plan(plan):
    assert plan["device"]
    assert plan["components"], plan
    for comp in plan["components"]:
        assert comp["strategy"] in PLAN_STRATEGIES, comp
        assert comp["role"] and comp["label"]
        assert comp["vram_gb"] >= 0 and comp["ram_gb"] >= 0
    assert plan["predicted_peak_vram_gb"] >= 0 and plan["predicted_peak_ram_gb"] >= 0
    assert isinstance(plan["notes"], list)


def test_memory_plan_endpoints(client, studio):
    plan = client.predict(api_name="/memory_plan")
    _check_plan(plan)
    assert plan["vram_limit_gb"] == studio.engine.vram_limit
    before = studio.engine.vram_limit
    try:
        limited = client.predict(3.5, api_name="/set_vram_limit")
        _check_plan(limited)
        assert limited["vram_limit_gb"] == 3.5 and studio.engine.vram_limit == 3.5
        assert client.predict(api_name="/memory_plan")["vram_limit_gb"] == 3.5
        # Generating still works under the new plan, without a restart.
        images, _, seed = _generate(client, seed=7)
        assert seed == 7 and len(images) == 1
        unlimited = client.predict(0, api_name="/set_vram_limit")  # 0 = no limit
        assert unlimited["vram_limit_gb"] is None and studio.engine.vram_limit is None
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError) as caught:
            client.predict(-1, api_name="/set_vram_limit")
        assert "minimum" in str(caught.value) or "negative" in str(caught.value)
    finally:
        studio.engine.set_vram_limit(before)


def test_plan_is_shown_in_plain_words():
    from tabs.settings import plan_table_html, strategy_text

    assert strategy_text("resident", "cuda:0") == "on GPU"
    assert strategy_text("offload", "cuda:0") == "in RAM, moved to GPU when used"
    assert strategy_text("fp8", "cuda") == "on GPU, stored in fp8"
    assert strategy_text("stream", "cuda:1") == "in RAM, streamed to GPU block by block"
    table = plan_table_html({"device": "cuda:0", "components": [
        {"role": "dit", "label": "Transformer", "strategy": "fp8+offload", "storage_dtype": "float8_e4m3fn",
         "compute_dtype": "bfloat16", "vram_gb": 0, "ram_gb": 11.9}]})
    assert "in RAM, stored in fp8, moved to GPU when used" in table and "fp8 (e4m3)" in table and "11.9 GB" in table


def test_new_ui_modules_do_not_import_torch():
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys, app.studio, tabs.generate, tabs.settings\n"
            "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
