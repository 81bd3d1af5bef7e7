"""The model manager (studio.model_manager, engine.hub_files): listing, downloads through a local fake Hugging Face
hub (a stdlib HTTP server speaking the endpoints huggingface_hub calls: the tree listing, HEAD and GET of
/{repo}/resolve/{revision}/{file} with Range), resume, cancel, hashes, offline checks, delete, and the token.

The suite runs with HF_HUB_OFFLINE=1; the tests that use the fake hub switch it off for themselves (the environment
and huggingface_hub's constant, both restored by monkeypatch).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import re
import shutil
import struct
import threading

import pytest

from engine import registry
from engine.errors import EngineError
from studio import model_facts
from studio.catalogue import Catalogue
from studio.model_manager import ModelManager, entries

TOKEN = "hf_testtoken_never_on_disk_0123456789"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blob(seed: str, size: int) -> bytes:
    """``size`` bytes of a valid .safetensors file (one uint8 tensor) with seeded contents."""
    head = b"{}"
    for _ in range(2):       # the header's length depends on the tensor's, which depends on the header's
        n = size - 8 - len(head)
        head = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    head = head.ljust(size - 8 - n)
    return struct.pack("<Q", len(head)) + head + (hashlib.sha256(seed.encode()).digest() * (n // 32 + 1))[:n]


class FakeHub:
    """Repositories {repo: {path: bytes}}; ``published`` overrides a file's listed sha256; ``hold`` stops a GET
    after its first half until released; every request is logged (method, path, Range, Authorization)."""

    def __init__(self, repos: dict):
        self.repos, self.published, self.log = repos, {}, []
        self.gated: dict = {}       # repo -> the token it asks for (a gated repository: 401 without it)
        self.hold: threading.Event | None = None
        self.holding = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, head=True)

            def do_GET(self):
                hub.serve(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sha(self, repo, path):
        return self.published.get((repo, path)) or hashlib.sha256(self.repos[repo][path]).hexdigest()

    def serve(self, req, head):
        self.log.append((req.command, req.path, req.headers.get("Range"), req.headers.get("Authorization")))
        tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/?]+)", req.path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", req.path)
        repo = (tree or resolve).group(1) if tree or resolve else ""
        if repo in self.gated and req.headers.get("Authorization") != f"Bearer {self.gated[repo]}":
            return self.reply(req, 401, b'{"error": "Access to this model is restricted."}',
                              {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted."}, head)
        if tree and tree.group(1) in self.repos:
            repo = tree.group(1)
            body = json.dumps([{"type": "file", "path": p, "size": len(d), "oid": "0" * 40,
                                "lfs": {"oid": self.sha(repo, p), "size": len(d), "pointerSize": 134}}
                               for p, d in self.repos[repo].items()]).encode()
            return self.reply(req, 200, body, {"Content-Type": "application/json"}, head)
        if resolve and resolve.group(1) in self.repos and resolve.group(3) in self.repos[resolve.group(1)]:
            repo, path = resolve.group(1), resolve.group(3)
            data = self.repos[repo][path]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self.sha(repo, path)}"', "Accept-Ranges": "bytes"}
            start = int(re.match(r"bytes=(\d+)-", req.headers["Range"]).group(1)) if req.headers.get("Range") else 0
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self.reply(req, 206 if start else 200, data[start:], headers, head)
        return self.reply(req, 404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, head)

    def reply(self, req, status, body, headers, head):
        req.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(k, v)
        req.end_headers()
        if head:
            return
        if self.hold is not None and not head and len(body) > 1000:
            half = len(body) // 2
            req.wfile.write(body[:half])
            req.wfile.flush()
            self.holding.set()
            self.hold.wait(20)
            body = body[half:]
        req.wfile.write(body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


SCHNELL = registry.get_variant("FLUX.1-schnell")
REDUX = "FLUX.1-Redux-dev"


def _repos() -> dict:
    """Small stand-ins for FLUX.1-schnell (with FLUX.1-dev's shared files) and FLUX.1-Redux-dev, named as on the hub."""
    dev = {"ae.safetensors": _blob("ae", 3000), "text_encoder/model.safetensors": _blob("clip", 2000),
           "text_encoder_2/model-00001-of-00002.safetensors": _blob("t5a", 4000),
           "text_encoder_2/model-00002-of-00002.safetensors": _blob("t5b", 1500),
           "text_encoder_2/config.json": b"{}", "tokenizer/vocab.json": b'{"a": 1}',
           "tokenizer_2/spiece.model": _blob("sp", 500), "flux1-dev.safetensors": _blob("dev", 9000)}
    return {"black-forest-labs/FLUX.1-dev": dev,
            "black-forest-labs/FLUX.1-schnell": {"flux1-schnell.safetensors": _blob("schnell", 64_000)},
            "black-forest-labs/FLUX.1-Redux-dev": {"image_encoder/model.safetensors": _blob("siglip", 5000),
                                                   "image_embedder/diffusion_pytorch_model.safetensors":
                                                       _blob("emb", 2500)}}


@pytest.fixture(scope="module")
def hub():
    server = FakeHub(_repos())
    yield server
    server.close()


@pytest.fixture
def online(hub, monkeypatch):
    """The fake hub as Hugging Face, for this test only."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.log.clear()
    hub.published.clear()
    hub.gated.clear()
    hub.hold = None
    return hub


def _all_bytes(folder: pathlib.Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------- listing
def test_entries_cover_the_registry():
    names = {e.name for e in entries()}
    assert {v.name for v in registry.VARIANTS} <= names
    assert {a.name for a in registry.ADAPTERS} <= names
    assert {f"ControlNet {c.name}" for c in registry.CONTROLNETS} <= names


def test_known_sizes_are_the_manifests(manifests_dir):
    """Every size in the table is a manifest's recorded tensor bytes for that repository."""
    index = json.loads((manifests_dir / "index.json").read_text())
    recorded = {(e.get("repo"), e.get("data_bytes")) for e in index}
    for (repo, pattern), size in model_facts.KNOWN_SIZES.items():
        assert (repo, size) in recorded, (repo, pattern, size)


def test_listing_with_the_demo_and_a_partial_file(demo_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(demo_dir, models / registry.DEMO_ID)
    part = models / "black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1234)
    rows = {r["name"]: r for r in ModelManager(models).rows()}

    demo = rows["FLUX.1-dev-random-demo"]
    assert demo["installed"] and demo["status"] == "installed" and demo["kind"] == "demo model"
    on_disk = sum(p.stat().st_size for p in (models / registry.DEMO_ID).rglob("*") if p.is_file())
    assert (models / registry.DEMO_ID / "flux1-dev.safetensors").stat().st_size < demo["on_disk"] <= on_disk
    assert rows["FLUX.1-schnell"]["status"] == "not downloaded (a partial download to resume)"
    assert rows["FLUX.1-schnell"]["licence"].startswith("Apache-2.0; shared files: FLUX.1 [dev] Non-Commercial")
    assert rows["FLUX.1-dev"]["gated"] and not rows["FLUX.1-schnell"]["installed"]
    assert rows["FLUX.1-dev"]["size"] == "≈ 31.6 GB"            # the manifests' weights (tokenizers left out)
    assert rows["Nexus-GenV2"]["size"] == "unknown"              # no manifest: unknown offline
    assert rows["Step1X-Edit-random-demo"]["status"] == "demo: written on first use"
    assert rows["Nexus-GenV2-random-demo"]["status"] == "demo: written on first use"   # though its shared files are here
    plan = ModelManager(models).delete_plan("FLUX.1-dev-random-demo")     # asked before a delete
    assert plan["also"] == ["FLUX.1-Kontext-dev-random-demo"] and not plan["kept"] and part not in plan["files"]
    assert plan["bytes"] == demo["on_disk"]
    disk = ModelManager(models).disk()
    assert disk["used"] >= on_disk + 1234 and disk["free"] > 0 and disk["total"] >= disk["free"]


# --------------------------------------------------------------------------------------------------- download
def test_download_resumes_in_the_background_and_the_catalogue_sees_it(online, tmp_path):
    models = tmp_path / "models"
    manager = ModelManager(models)
    data = online.repos["black-forest-labs/FLUX.1-schnell"]["flux1-schnell.safetensors"]
    part = models / "black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:10_000])                      # an earlier, interrupted download
    online.hold = threading.Event()                      # the hub stops half-way through each big file...
    state = manager.start_download("FLUX.1-schnell", "HuggingFace", TOKEN)
    assert state["phase"] == "running"                   # ...and start_download has already returned
    assert online.holding.wait(10)
    assert manager.state()["phase"] == "running" and not Catalogue(models).available(SCHNELL)
    online.hold.set()
    state = manager.wait(30)
    assert state["phase"] == "done", state["message"]
    assert state["done"] == state["total"] > 0
    assert (models / "black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors").read_bytes() == data
    assert not part.exists()
    gets = [r for r in online.log if r[0] == "GET" and r[1].endswith("flux1-schnell.safetensors")]
    assert gets and gets[0][2] == "bytes=10000-"         # resumed from the partial file
    assert Catalogue(models).available(SCHNELL)          # the studio offers it as downloaded
    assert "installed" == {r["name"]: r for r in manager.rows()}["FLUX.1-schnell"]["status"]
    # The token went to the hub with the requests, and nowhere else.
    assert all(auth == f"Bearer {TOKEN}" for _, _, _, auth in online.log)
    assert TOKEN.encode() not in _all_bytes(models) and TOKEN not in json.dumps(manager.state())
    record = json.loads((models / "black-forest-labs/FLUX.1-schnell/.flux-studio-files.json").read_text())
    assert record["flux1-schnell.safetensors"]["size"] == len(data)

    # Offline, verify compares with what was recorded at download: a damaged file is reported.
    os.environ["HF_HUB_OFFLINE"] = "1"                   # monkeypatch restores it
    target = models / "black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors"
    target.write_bytes(data[:-7])
    state = manager.start_verify("FLUX.1-schnell", "HuggingFace") and manager.wait(30)
    assert state["phase"] == "failed" and "flux1-schnell.safetensors is 63,993 bytes, expected 64,000" in \
        state["message"], state["message"]

    # Delete removes its files (in the models folder only) and the catalogue no longer offers it as downloaded.
    message = manager.delete("FLUX.1-schnell")
    assert message.startswith("Deleted FLUX.1-schnell: 7 file(s)") and not Catalogue(models).available(SCHNELL)
    assert not (models / "black-forest-labs").exists()


def test_gated_wrong_hash_and_cancel(online, tmp_path):
    models = tmp_path / "models"
    manager = ModelManager(models)
    online.gated["black-forest-labs/FLUX.1-Redux-dev"] = TOKEN
    state = manager.start_download(REDUX, "Hugging Face") and manager.wait(30)
    assert state["phase"] == "failed" and "gated or needs a token" in state["message"], state["message"]
    online.published[("black-forest-labs/FLUX.1-Redux-dev", "image_encoder/model.safetensors")] = "ab" * 32
    state = manager.start_download(REDUX, "Hugging Face", f" {TOKEN} ") and manager.wait(30)
    assert state["phase"] == "done", state["message"]    # the size is right: the download itself succeeds
    state = manager.start_verify(REDUX, "HuggingFace", TOKEN) and manager.wait(30)
    assert state["phase"] == "failed"
    assert "image_encoder/model.safetensors does not match its published sha256" in state["message"]
    assert "image_embedder" not in state["message"]      # the other file's hash matched

    # Cancel: the hub holds the transfer, the person cancels, the file never becomes whole.
    assert "Deleted FLUX.1-Redux-dev: 2 file(s)" in manager.delete(REDUX)
    online.hold, online.holding = threading.Event(), threading.Event()
    manager.start_download(REDUX, "HuggingFace", TOKEN)
    assert online.holding.wait(10)
    manager.cancel()
    online.hold.set()
    state = manager.wait(30)
    assert state["phase"] == "cancelled", state["message"]
    assert not (models / "black-forest-labs/FLUX.1-Redux-dev/image_encoder/model.safetensors").exists()
    assert "not downloaded" in {r["name"]: r for r in manager.rows()}[REDUX]["status"]


def test_offline_download_says_why_and_demo_is_not_downloaded(tmp_path):
    manager = ModelManager(tmp_path / "models")
    state = manager.start_download("FLUX.1-dev", "HuggingFace", TOKEN) and manager.wait(30)
    assert state["phase"] == "failed" and "HF_HUB_OFFLINE=1" in state["message"]
    assert TOKEN not in json.dumps(state)
    with pytest.raises(EngineError, match="random-weight demo"):
        manager.start_download("FLUX.1-dev-random-demo", "HuggingFace")
    with pytest.raises(EngineError, match="Unknown download source"):
        manager.start_download("FLUX.1-dev", "Dropbox")


# ------------------------------------------------------------------------------------------------------ delete
def test_delete_refuses_paths_outside_the_models_folder(tmp_path):
    models = tmp_path / "models"
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(b"keep me")
    folder = models / "black-forest-labs/FLUX.1-Redux-dev"
    (folder / "image_encoder").mkdir(parents=True)
    (folder / "image_embedder").mkdir(parents=True)
    (folder / "image_embedder/diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (folder / "image_encoder/model.safetensors").symlink_to(outside)
    manager = ModelManager(models)
    with pytest.raises(EngineError, match="not inside the models folder"):
        manager.delete(REDUX)
    assert outside.read_bytes() == b"keep me"
    assert (folder / "image_embedder/diffusion_pytorch_model.safetensors").exists()   # nothing removed
    for path in (outside, models, models / ".." / "precious.safetensors", "/etc/passwd"):
        with pytest.raises(EngineError, match="not inside the models folder"):
            manager.inside(path)


def test_a_shared_studio_lists_and_verifies_but_never_downloads_or_deletes(demo_dir):
    manager = ModelManager(demo_dir.parents[1], writable=False)
    with pytest.raises(EngineError, match="only its owner can download"):
        manager.start_download("FLUX.1-dev", "HuggingFace")
    with pytest.raises(EngineError, match="only its owner can delete"):
        manager.delete("FLUX.1-dev-random-demo")
    assert {r["name"]: r for r in manager.rows()}["FLUX.1-dev-random-demo"]["installed"]
