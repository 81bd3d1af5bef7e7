"""One model's files on a hub, file by file: what the hub lists (path, size, sha256 where published), fetching one
file into the models folder with byte progress, resume and cancel, and checking a local file against what is known.

The studio's model manager (``studio.model_manager``) runs these in its own thread. The layout is
``engine.downloads``': ``<models>/<model_id>/<path in the repository>``; a file being fetched is
``<that path>.incomplete`` until it is whole (``engine.model_config.match_local_files`` ignores those), and stays
there when the transfer stops, so the next fetch resumes it (an HTTP Range request).

- Hugging Face: ``HfApi.list_repo_tree`` (sizes, LFS sha256), ``get_hf_file_metadata`` and ``http_get`` (the hub
  client's own transfer, with its retries and Range resume) into the partial file; ``HF_ENDPOINT`` is honoured.
- ModelScope: ``modelscope_hub``'s ``list_repo_files`` (sizes, sha256) and ``model_file_download`` (the client
  resumes its own partial files and checks the hash); progress is the partial file's size, polled; a cancel takes
  effect between files.

A token is handed to the hub call and nowhere else: never written, never put in a message.
No torch, no gradio; the hub clients are imported when used.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import pathlib
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlparse

from .downloads import SOURCES
from .errors import EngineError

PARTIAL_SUFFIX = ".incomplete"
OnBytes = Callable[[int], None]


class DownloadCancelled(EngineError):
    """The person cancelled the download; the partial file stays for the next one to resume."""


@dataclass(frozen=True)
class RemoteFile:
    path: str                      # inside the repository, with "/"
    size: Optional[int] = None     # bytes, as the hub lists it
    sha256: Optional[str] = None   # where the hub publishes it (Hugging Face's LFS files)


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_source(source: str) -> str:
    for s in SOURCES:
        if str(source).lower().replace(" ", "") == s.lower():
            return s
    raise EngineError(f"Unknown download source {source!r}: choose one of {', '.join(SOURCES)}.")


def _endpoint_of(source: str) -> str:
    if source == "HuggingFace":
        return hf_endpoint()
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    return domain if "://" in domain else "https://" + domain


def offline_reason(source: str) -> Optional[str]:
    """Why this source cannot be used now (turned off, or its host cannot be reached), or None."""
    source = check_source(source)
    if os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").lower() in ("1", "true", "yes"):
        return "downloads are turned off (DIFFSYNTH_SKIP_DOWNLOAD)"
    if source == "HuggingFace" and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "Hugging Face is set offline (HF_HUB_OFFLINE=1)"
    url = urlparse(_endpoint_of(source))
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=3.0):
            return None
    except OSError:
        return f"{host} cannot be reached"


def matches(path: str, pattern: str) -> bool:
    """Whether a repository path is one a catalogue pattern names ("tokenizer/": the whole folder, as in
    engine.downloads)."""
    if pattern.endswith("/"):
        return path.startswith(pattern)
    return fnmatch.fnmatchcase(path, pattern)


def list_files(model_id: str, patterns, source: str, token: Optional[str] = None) -> list[RemoteFile]:
    """The repository's files that ``patterns`` name, with the sizes (and sha256) the hub publishes."""
    source = check_source(source)
    if source == "HuggingFace":
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile
        entries = HfApi(endpoint=hf_endpoint(), token=token).list_repo_tree(model_id, recursive=True)
        found = [RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None) for e in entries
                 if isinstance(e, RepoFile)]
    else:
        found = _modelscope_files(model_id, token)
    return [f for f in found if any(matches(f.path, p) for p in patterns)]


def _modelscope_files(model_id: str, token: Optional[str]) -> list[RemoteFile]:
    """ModelScope's listing with sizes and sha256 (modelscope-hub's client; the older modelscope API's keys as a
    fallback). A token is handed to the client, never to ``login`` (which saves it to disk)."""
    try:
        from modelscope_hub.api import HubApi
    except ImportError:
        from modelscope.hub.api import HubApi as LegacyApi
        return [RemoteFile(str(e["Path"]), e.get("Size"), e.get("Sha256"))
                for e in LegacyApi(token=token or None).get_model_files(model_id, recursive=True)
                if e.get("Type", "blob") != "tree"]
    files = HubApi(token=token or None).list_repo_files(model_id, "model", recursive=True)
    return [RemoteFile(f.path, f.size, f.sha256) for f in files if not f.is_dir]


class _Progress:
    """What the hub client's progress bar is handed (a tqdm stand-in): bytes to ``on_bytes``; a cancel stops the
    transfer at its next chunk."""

    def __init__(self, on_bytes: OnBytes, cancelled: threading.Event, initial: int = 0, **_):
        self.n, self.on_bytes, self.cancelled = int(initial or 0), on_bytes, cancelled
        on_bytes(self.n)

    def update(self, n: int = 1) -> None:
        if self.cancelled.is_set():
            raise DownloadCancelled("Download cancelled.")
        self.n += n
        self.on_bytes(self.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self) -> None:
        pass


def partial_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fetch_file(model_id: str, remote: RemoteFile, folder: pathlib.Path, source: str, token: Optional[str] = None,
               on_bytes: OnBytes = lambda n: None, cancelled: Optional[threading.Event] = None) -> pathlib.Path:
    """Fetch one file to ``folder/remote.path``, resuming its partial file. Raises ``DownloadCancelled``."""
    cancelled = cancelled or threading.Event()
    target = pathlib.Path(folder) / remote.path
    target.parent.mkdir(parents=True, exist_ok=True)
    if check_source(source) == "HuggingFace":
        _fetch_hf(model_id, remote, target, token, on_bytes, cancelled)
    else:
        _fetch_modelscope(model_id, remote, target, token, on_bytes, cancelled)
    return target


def _fetch_hf(model_id, remote, target, token, on_bytes, cancelled) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    url = hf_hub_url(model_id, remote.path, endpoint=hf_endpoint())
    meta = get_hf_file_metadata(url, token=token)
    size = meta.size if meta.size is not None else remote.size
    part = partial_path(target)
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:      # not this file's beginning: start again
        part.unlink()
        have = 0
    if cancelled.is_set():
        raise DownloadCancelled("Download cancelled.")
    with open(part, "ab") as handle:
        http_get(meta.location or url, handle, resume_size=have, headers=build_hf_headers(token=token),
                 expected_size=size, displayed_filename=remote.path,
                 tqdm_class=lambda **kw: _Progress(on_bytes, cancelled, **kw))
    os.replace(part, target)


def _fetch_modelscope(model_id, remote, target, token, on_bytes, cancelled) -> None:
    from modelscope.hub.file_download import model_file_download
    folder = target.parents[len(pathlib.PurePosixPath(remote.path).parts) - 1]
    done = threading.Event()

    def poll():           # the client writes <file>.incomplete (or a parallel temporary) and resumes it itself
        while not done.wait(0.5):
            sizes = [p.stat().st_size for p in (partial_path(target), target.with_name(target.name + ".parallel_tmp"),
                                                target) if p.is_file()]
            on_bytes(max(sizes, default=0))

    watcher = threading.Thread(target=poll, daemon=True, name="modelscope-progress")
    watcher.start()
    try:
        if cancelled.is_set():
            raise DownloadCancelled("Download cancelled.")
        model_file_download(model_id, remote.path, local_dir=str(folder), token=token)
    finally:
        done.set()
        watcher.join()
    on_bytes(target.stat().st_size if target.is_file() else 0)


def sha256_of(path: pathlib.Path, on_bytes: OnBytes = lambda n: None,
              cancelled: Optional[threading.Event] = None) -> str:
    digest, done = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            if cancelled is not None and cancelled.is_set():
                raise DownloadCancelled("Check cancelled.")
            digest.update(chunk)
            done += len(chunk)
            on_bytes(done)
    return digest.hexdigest()


def file_problem(path: pathlib.Path, size: Optional[int], sha256: Optional[str] = None, on_bytes: OnBytes = lambda n: None,
                 cancelled: Optional[threading.Event] = None, label: Optional[str] = None) -> Optional[str]:
    """What is wrong with a local file against the known size (and sha256), or None when it matches. ``label``
    names the file in the message (default: its name)."""
    label = label or path.name
    if not path.is_file():
        return f"{label} is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{label} is {actual:,} bytes, expected {size:,} (an incomplete or different file)"
    if sha256 and sha256_of(path, on_bytes, cancelled) != sha256.lower():
        return f"{label} does not match its published sha256 (a damaged or different file)"
    return None


def safetensors_problem(path: pathlib.Path, label: Optional[str] = None) -> Optional[str]:
    """Offline structural check of a .safetensors file: its header parses and the tensors it lists end exactly where
    the file ends (a truncated or padded file fails). None when it holds together."""
    import json
    import struct
    label = label or path.name
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{label} is too short to be a safetensors file"
        length = struct.unpack("<Q", head)[0]
        if length > size - 8:
            return f"{label}: its header says {length:,} bytes but the file has {size:,} (truncated)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return f"{label}: the safetensors header is not readable"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) != size:
        return (f"{label} is {size:,} bytes but its tensors need {8 + length + max(ends, default=0):,} "
                f"(truncated or damaged)")
    return None
