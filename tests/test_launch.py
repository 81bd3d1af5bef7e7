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


def test_ui_modules_do_not_import_torch():
    code = (
        "import sys, launch, app.studio, app.common, tabs.generate\n"
        "import app.controls, app.gallery, app.lora_picker, app.recipe_text, app.restore\n"
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


def test_launch_serves_the_studio_and_prints_the_url(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # launch.py must turn analytics off by itself
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), "--demo", "--port", str(port),
         "--models-dir", str(tmp_path / "models"), "--outputs-dir", str(tmp_path / "outputs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
    )
    try:
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
