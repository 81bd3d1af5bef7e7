"""What held when issue 12's attacker tried the studio, kept as tests so that it keeps holding.

- every file the studio writes survives kill -9 whole (results and the copies beside them), and two processes on
  one outputs folder overwrite nothing;
- 20 clients at once each get their own, correct image;
- /gradio_api/file= serves nothing outside the outputs folder, in any spelling of a path;
- LoRA names with "..", absolute paths and links out of the folder are refused; a pickled LoRA never runs code;
- an EliGen layout zip cannot write outside (zip slip);
- the studio listens on 127.0.0.1 with --share off unless asked;
- memory stays flat over alternating jobs (text to image and edits).
(A killed training run resuming bit-identically is tests/test_training.py::test_killed_process_resumes_to_the_same_weights.)
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import pytest
from PIL import Image

from engine.errors import EngineError
from tests.helpers import linked_models
from tests.test_app_client import DEMO

REPO = pathlib.Path(__file__).resolve().parent.parent


def _whole(path: pathlib.Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


WRITER = textwrap.dedent("""
    import pathlib, sys
    import numpy as np
    from PIL import Image
    from studio import recipes as recipe
    from engine import safe_files
    out = pathlib.Path(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    side = int(sys.argv[4])
    img = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))   # noise: a slow, large PNG
    for i in range(int(sys.argv[3])):
        path = recipe.save_image(img, {"seed": i, "prompt": "x"}, out)
        safe_files.save_image(img, path.with_name(path.stem + ".ctl0.png"))
        print(path.name, flush=True)
""")


def _writer(out, seed, count, side=768):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(seed), str(count), str(side)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_kill_9_while_writing_leaves_no_torn_file(tmp_path):
    """The attack: killing the studio while it writes <n>.ctl0.png left truncated PNGs that restore handed back."""
    for attempt in range(4):
        proc = _writer(tmp_path, attempt, 1000)
        proc.stdout.readline()                       # it is writing
        time.sleep(0.05 + 0.07 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finals = [p for p in tmp_path.rglob("*.png") if not p.name.startswith(".")]
    assert len(finals) >= 4
    torn = [p.name for p in finals if not _whole(p)]
    assert not torn, f"torn files under their final names: {torn}"


def test_two_processes_on_one_outputs_folder_overwrite_nothing(tmp_path):
    procs = [_writer(tmp_path, seed, 12, side=128) for seed in (1, 2)]
    names = [line.strip() for p in procs for line in p.communicate(timeout=120)[0].splitlines()]
    assert all(p.returncode == 0 for p in procs)
    results = sorted(p for p in tmp_path.rglob("*.png") if ".ctl0" not in p.name)
    assert len(names) == 24 == len(set(names)) == len(results)
    assert all(_whole(p) for p in results)


# ------------------------------------------------------------------------------------------------- the served studio
CLIENTS = 10       # more than the queue runs at once: the rest wait, and each still gets its own image


@pytest.fixture(scope="module")
def served(studio):
    return studio                    # the session's studio (tests/conftest.py)


def test_ten_clients_at_once_each_get_their_own_image(served):
    from gradio_client import Client

    results, errors = {}, []

    def one(seed):
        try:
            client = Client(served.url, verbose=False)
            images, _, got = client.predict(DEMO, f"client {seed}", "", 64, 64, 1, 3.5, 1.0, seed, 1,
                                            api_name="/generate")
            results[seed] = (got, images[0]["image"])
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(1000 + k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and len(results) == CLIENTS
    assert all(got == seed for seed, (got, _) in results.items())
    saved = {}
    for seed, (_, image) in results.items():
        from studio import recipes as R
        found = R.read_recipe(image)
        assert found["seed"] == seed and found["prompt"] == f"client {seed}"
        saved[found["seed"]] = image
    assert len(set(saved.values())) == CLIENTS


def test_file_route_serves_nothing_outside_the_outputs_folder(served, tmp_path):
    secret = served.outputs.parent / "secret.txt"          # beside the outputs folder: never served
    secret.write_text("TOP SECRET")
    (served.outputs / "a").mkdir(parents=True, exist_ok=True)
    link = served.outputs / "a" / "link.txt"
    if not link.exists():
        link.symlink_to(secret)
    out = str(served.outputs)
    forms = [str(secret), f"{out}/../secret.txt", f"{out}/a/../../secret.txt", f"{out}/a/link.txt",
             "../secret.txt", "../../../../../etc/passwd", "/etc/passwd", "..%2fsecret.txt",
             urllib.parse.quote(f"{out}/../secret.txt", safe=""), f"{out}/%2e%2e/secret.txt",
             f"{out}/..%2fsecret.txt", f"{out}/a/..%5c..%5csecret.txt", f"{out}//../secret.txt",
             f"{out}/./../secret.txt", f"file://{secret}", f"{out}/../secret.txt%00.png",
             "~/.bashrc", "%2e%2e/%2e%2e/etc/passwd", f"{out}/a/link.txt/", f"{out}\\..\\secret.txt",
             f"{out}/a/%2e%2e/%2e%2e/secret.txt", "/proc/self/environ"]
    assert len(forms) == 22
    for form in forms:
        url = served.url.rstrip("/") + "/gradio_api/file=" + form
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
        except (urllib.error.HTTPError, urllib.error.URLError, ValueError):
            continue
        assert b"TOP SECRET" not in body and b"root:" not in body and b"PATH=" not in body, form


# ------------------------------------------------------------------------------------------------- files as data
@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("held")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs")


def test_lora_names_stay_inside_the_lora_folder(engine, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"{}")
    loras = engine.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    link = loras / "link.safetensors"
    if not link.exists():
        link.symlink_to(outside)
    for name in ("../../outside.safetensors", str(outside), "link.safetensors", "sub/../../x.safetensors"):
        with pytest.raises(EngineError):
            engine.validate({"variant": DEMO, "prompt": "x", "loras": [{"name": name, "weight": 1.0}]})


def test_a_pickled_lora_never_runs_code(engine, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    path = engine.models_dir / "loras" / "evil.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Payload()}))
    with pytest.raises(EngineError):
        engine.generate({"variant": DEMO, "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1,
                         "loras": [{"name": "evil.bin", "weight": 1.0}]})
    assert not marker.exists()


def test_a_layout_zip_cannot_write_outside(engine, tmp_path):
    from studio import eligen_layout
    zpath = engine.outputs_dir / "slip.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("prompts.json", json.dumps({"prompt": "x", "mask_prompts": ["a"], "width": 64, "height": 64}))
        z.writestr("../../escaped.png", b"\x89PNG")
        z.writestr("/abs-escaped.png", b"\x89PNG")
    before = set(tmp_path.parent.rglob("escaped.png"))
    with pytest.raises(EngineError):
        eligen_layout.load_layout_file(zpath)
    assert set(tmp_path.parent.rglob("escaped.png")) == before and not pathlib.Path("/abs-escaped.png").exists()


def test_the_studio_listens_locally_and_shares_only_when_asked():
    import launch
    parser = launch.build_parser()
    args = parser.parse_args([])
    assert launch.check_args(parser, args) is None             # no --auth
    assert args.host == "127.0.0.1" and args.share is False and args.auth is None


def test_memory_stays_flat_over_alternating_jobs(engine, tmp_path):
    import psutil
    photo = engine.outputs_dir / "in" / "photo.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (90, 60, 30)).save(photo)
    # Text to image and an edit with a reference (the Kontext demo shares the demo's files: no reload per job).
    jobs = [{"variant": DEMO, "prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 1},
            {"variant": "FLUX.1-Kontext-dev-random-demo", "prompt": "make it red", "kontext_images": [str(photo)],
             "width": 64, "height": 64, "num_inference_steps": 1}]
    rss = psutil.Process().memory_info().rss
    for k in range(22):                              # each job ends with a full gc pass: ~1 s apiece here
        engine.generate({**jobs[k % 2], "seed": k})
        if k == 5:                                   # after warm-up: both models loaded once, caches filled
            rss = psutil.Process().memory_info().rss
    grown = (psutil.Process().memory_info().rss - rss) / 2 ** 20
    assert grown < 100, f"RSS grew by {grown:.0f} MB over 16 jobs"


def test_restore_offers_only_whole_copies(engine, tmp_path):
    """A copy beside a result that is torn (an older version's crash) or not an image is not handed back."""
    photo = engine.outputs_dir / "in" / "ref.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), (10, 200, 40)).save(photo)
    [made] = engine.generate({"variant": "FLUX.1-Kontext-dev-random-demo", "prompt": "x", "kontext_images":
                              [str(photo)], "width": 64, "height": 64, "num_inference_steps": 1, "seed": 2})
    result = pathlib.Path(made["path"])
    copy = result.with_name(result.stem + ".ref0.png")
    assert engine.read_recipe(result)["kontext_images"] == [str(copy)]
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])              # torn
    assert "kontext_images" not in engine.read_recipe(result)
    copy.write_bytes(data)
    assert engine.read_recipe(result)["kontext_images"] == [str(copy)]
