"""launch.py's command line, and the rule that the UI layer never imports torch."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
FLAGS = ("--models-dir", "--vram-limit", "--device", "--demo", "--share", "--auth", "--port", "--host", "--allow-dir",
         "--allowed-hosts")


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_help_lists_the_flags():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert flag in result.stdout, flag
    assert "7860" in result.stdout and "127.0.0.1" in result.stdout


def test_bad_auth_gives_a_clear_message():
    for bad in ("alice", "alice:", ":secret", "alice:ok,bob"):
        result = _run("--auth", bad, "--demo")
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert "--auth expects USER:PASSWORD" in result.stderr, result.stderr
        assert "Example: --auth alice:s3cret" in result.stderr
        assert "Traceback" not in result.stderr


def test_other_bad_values_give_clear_messages():
    result = _run("--port", "70000")
    assert result.returncode == 2 and "--port must be between 1 and 65535" in result.stderr
    result = _run("--vram-limit", "-2")
    assert result.returncode == 2 and "--vram-limit must be a positive number" in result.stderr
    result = _run("--vram-limit", "lots")
    assert result.returncode == 2 and "invalid float value" in result.stderr
    result = _run("--allow-dir", "/no/such/folder")
    assert result.returncode == 2 and "--allow-dir /no/such/folder: no such folder" in result.stderr


def test_parse_auth():
    sys.path.insert(0, str(REPO))
    import launch

    assert launch.parse_auth(None) is None
    assert launch.parse_auth("alice:s3cret") == [("alice", "s3cret")]
    # A password may hold a colon; several logins separated by commas.
    assert launch.parse_auth("alice:a:b, bob:pw") == [("alice", "a:b"), ("bob", "pw")]


def test_ui_modules_do_not_import_torch(tmp_path):
    """Neither importing the UI nor building the whole page (every tab, the demo engine as launch.py makes it)
    imports torch: the page is served in seconds, models load on first use."""
    code = (
        "import sys, launch, app.studio, app.common, tabs.generate\n"
        "import app.controls, app.gallery, app.lora_picker, app.recipe_text, app.restore\n"
        "from studio import configure_engine\n"
        f"engine = configure_engine(models_dir={str(tmp_path / 'models')!r}, demo=True, "
        f"outputs_dir={str(tmp_path / 'outputs')!r}, defer_demo=True)\n"
        "app.studio.build_studio(engine)\n"
        "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


COLD_START_BOUND_S = 20


def _first_page(port: int, proc, started: float) -> float:
    """Seconds from ``started`` to the first HTTP 200 on / (polled every 50 ms)."""
    deadline = started + 90
    while time.perf_counter() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the page was not served within 90 s")


def test_launch_serves_the_studio_and_prints_the_url(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # launch.py must turn analytics off by itself
    launched = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), "--demo", "--port", str(port),
         "--models-dir", str(tmp_path / "models"), "--outputs-dir", str(tmp_path / "outputs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
    )
    try:
        served = _first_page(port, proc, started=launched)
        # Cold start (issue 17): the page comes before any model work (the demo's files are written after it). The
        # goal is <= 5 s on an idle machine; CI's shared 2 cores get a generous bound. The number is printed (-s).
        print(f"\ncold start: page served {served:.2f} s after `launch.py --demo` (fresh models folder)")
        assert served < COLD_START_BOUND_S, f"the page took {served:.1f} s to be served"
        lines = []
        deadline = time.time() + 90
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl+C" in line:
                break
        output = "".join(lines)
        assert f"FLUX Studio is running at http://127.0.0.1:{port}/" in output, output
        assert "random-weight demo" in output
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "FLUX Studio" in page
        # The port is taken now: a second studio says so instead of a traceback.
        started = time.time()
        second = _run("--demo", "--port", str(port), "--models-dir", str(tmp_path / "models"),
                      "--outputs-dir", str(tmp_path / "outputs2"), timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"could not listen on 127.0.0.1:{port}" in second.stderr and "--port" in second.stderr
        assert "Traceback" not in second.stderr
        assert time.time() - started < 10  # checked before the models load
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_fast_start_writes_the_demo_later_and_the_first_job_says_what_it_loads(tmp_path, demo_dir):
    """launch.py's engine (``defer_demo``) writes no demo files while starting yet offers the demo; the first job's
    progress names what it waits for: each file it loads, with its size, before the first step."""
    from studio.engine import Engine

    fresh = Engine(models_dir=tmp_path / "fresh", outputs_dir=tmp_path / "out1", demo=True, defer_demo=True)
    assert not list((tmp_path / "fresh").rglob("*.safetensors"))     # no demo files written at start
    assert any(v["demo"] and v["available"] for v in fresh.variants())   # the demo is still offered
    assert fresh.catalogue.demo_pending

    # The first job on a models folder whose demo is written (the session's): messages name the model files.
    engine = Engine(models_dir=demo_dir.parent.parent, outputs_dir=tmp_path / "out2", demo=True, defer_demo=True)
    messages = []
    engine.generate({"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 1},
                    progress=lambda done, total, message: messages.append(message))
    loading = [m for m in messages if m.startswith("Loading the ")]
    assert any(m.startswith("Loading the FLUX transformer from flux1-dev.safetensors (") for m in loading), messages
    assert any("VAE" in m and "from ae.safetensors (" in m for m in loading), messages
    assert any("T5" in m and "and 1 more (" in m for m in loading), messages       # a sharded file says so
    assert all(m.endswith(" MB)") or m.endswith(" GB)") for m in loading), loading
    assert messages.index(loading[0]) < next(i for i, m in enumerate(messages) if "step 1/1" in m), messages
