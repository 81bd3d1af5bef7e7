"""Fetching model files into the models folder from ModelScope (the seed's default) or Hugging Face.

Environment, as in the seed: DIFFSYNTH_MODEL_BASE_PATH (the folder, default ./models),
DIFFSYNTH_DOWNLOAD_SOURCE (ModelScope | HuggingFace), DIFFSYNTH_SKIP_DOWNLOAD=true (never download).
Both hubs resume partial downloads. Any failure becomes a ``ModelNotFoundError`` that names the file, the
model and the folder to put it in by hand.
"""
from __future__ import annotations

import os
import pathlib
import socket
from urllib.parse import urlparse

from .errors import ModelNotFoundError

SOURCES = ("ModelScope", "HuggingFace")


def models_base_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DIFFSYNTH_MODEL_BASE_PATH", "./models"))


def download_source() -> str:
    value = os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE", "ModelScope")
    for s in SOURCES:
        if value.lower() == s.lower():
            return s
    raise ModelNotFoundError(f"DIFFSYNTH_DOWNLOAD_SOURCE={value!r} is not one of {', '.join(SOURCES)}.")


def downloads_disabled() -> bool:
    return os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").lower() in ("1", "true", "yes") \
        or os.environ.get("HF_HUB_OFFLINE", "") == "1" and download_source() == "HuggingFace"


def local_dir_for(base: pathlib.Path, model_id: str) -> pathlib.Path:
    return pathlib.Path(base) / model_id


def _hub_patterns(patterns) -> list[str]:
    # "tokenizer/" means the whole folder on both hubs.
    return [p + "*" if p.endswith("/") else p for p in patterns]


def _missing_message(model_id, patterns, folder, reason) -> str:
    wanted = ", ".join(patterns)
    return (f"Model file {wanted} of {model_id} is not in {folder} and could not be downloaded ({reason}). "
            f"Download it from ModelScope or Hugging Face ({model_id}) and put it at {folder}/{patterns[0]}, "
            f"or connect to the internet and try again.")


def hub_host(source: str) -> str:
    if source == "ModelScope":
        domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
        return urlparse(domain).hostname or domain
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def reachable(host: str, timeout: float = 3.0) -> bool:
    """A quick look before handing over to a hub client, which retries for tens of seconds when offline."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def download(model_id: str, patterns, base: pathlib.Path, allow_download: bool = True) -> pathlib.Path:
    folder = local_dir_for(base, model_id)
    if not allow_download or downloads_disabled():
        raise ModelNotFoundError(_missing_message(model_id, patterns, folder, "downloads are turned off"))
    source = download_source()
    if not reachable(hub_host(source)):
        raise ModelNotFoundError(_missing_message(model_id, patterns, folder, f"{hub_host(source)} cannot be reached"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if source == "ModelScope":
            from modelscope import snapshot_download
            snapshot_download(model_id, local_dir=str(folder), allow_file_pattern=_hub_patterns(patterns))
        else:
            from huggingface_hub import snapshot_download
            snapshot_download(model_id, local_dir=str(folder), allow_patterns=_hub_patterns(patterns))
    except Exception as exc:  # every hub failure (offline, 404, auth) gets the same actionable message
        reason = f"{source}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise ModelNotFoundError(_missing_message(model_id, patterns, folder, reason)) from exc
    return folder
