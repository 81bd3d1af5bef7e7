"""Running as a Hugging Face Space: where to listen, the models folder (the Hub cache), training on or off.

A Space runs ``python launch.py`` (the README's ``app_file``) with ``SPACE_ID`` set (``owner/name``), ``SPACE_HOST``
(the name its page is served under) and ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` (where to listen). Its model
files are fetched by the Space's build (``preload_from_hub`` in the README) into the Hugging Face Hub cache, laid out
as ``models--<org>--<name>/snapshots/<revision>/<file>``, while the engine reads ``<models>/<model_id>/<file>``:
``link_hub_cache`` makes a folder of links in the engine's layout (``<view>/<org>/<name>`` -> that snapshot), so
the engine loads from the cache as it is, copying nothing.

Plain Python: no torch, no gradio. ``studio.zerogpu`` holds the ZeroGPU part.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional

TRAINING_ENV = "FLUX_STUDIO_TRAINING"      # "1" on a Space turns the Train tab on (its owner's choice)
VIEW_FOLDER = "flux-studio-models"         # the links folder, beside the Hub cache (inside HF_HOME)
TRAINING_OFF_NOTE = (
    "Training is off on this Space: a training run holds the GPU for hours and would stop everyone else's images. "
    f"The Space's owner can turn it on with the variable {TRAINING_ENV}=1 in the Space's settings (on a Space with a "
    "GPU of its own: ZeroGPU lends a GPU for one job at a time only), or run the studio on their own machine: "
    "python launch.py.")


def _flag(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def on_space(environ: Mapping[str, str] = os.environ) -> bool:
    """Running as a Hugging Face Space (the Space sets SPACE_ID)."""
    return bool(environ.get("SPACE_ID", "").strip())


def zero_gpu(environ: Mapping[str, str] = os.environ) -> bool:
    """On ZeroGPU hardware: the ``spaces`` package's own test (SPACES_ZERO_GPU true/1/t)."""
    return (environ.get("SPACES_ZERO_GPU") or "").strip().lower() in ("1", "t", "true")


def training_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Training is on off a Space; on a Space only when its owner sets FLUX_STUDIO_TRAINING=1 (never on ZeroGPU,
    whose GPU is lent one decorated call at a time)."""
    if not on_space(environ):
        return True
    return _flag(environ.get(TRAINING_ENV)) and not zero_gpu(environ)


def server_defaults(environ: Mapping[str, str] = os.environ, host: str = "127.0.0.1",
                    port: int = 7860) -> tuple[str, int]:
    """(host, port) to listen on when no --host / --port is given: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (what a
    Space sets, as Gradio itself reads them), else ``host`` / ``port``. A port that is not a number is an error
    naming the variable."""
    name = (environ.get("GRADIO_SERVER_NAME") or "").strip() or host
    text = (environ.get("GRADIO_SERVER_PORT") or "").strip()
    if not text:
        return name, port
    number = int(text) if text.isdigit() else 0
    if not 1 <= number <= 65535:
        raise ValueError(f"GRADIO_SERVER_PORT={text!r} is not a port number: set it to one from 1 to 65535, or "
                         f"unset it and use --port.")
    return name, number


def hub_cache(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    """The Hugging Face Hub cache, as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub); read from ``environ`` so that a test can point it elsewhere."""
    if environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.path.expandvars(environ["HF_HUB_CACHE"])).expanduser()
    if environ.get("HF_HOME"):
        return pathlib.Path(os.path.expandvars(environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants
    return pathlib.Path(constants.HF_HUB_CACHE)


def snapshot_dir(cache: pathlib.Path, model_id: str) -> Optional[pathlib.Path]:
    """The cached snapshot of ``model_id`` (``refs/main``'s, else the newest), or None when it is not cached."""
    repo = pathlib.Path(cache) / ("models--" + model_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        wanted = snapshots / ref.read_text(encoding="utf-8").strip()
        if wanted.is_dir():
            return wanted
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def cached_models(cache: pathlib.Path) -> list[str]:
    """The model ids (``org/name``) with a snapshot in the Hub cache."""
    cache = pathlib.Path(cache)
    if not cache.is_dir():
        return []
    out = []
    for repo in sorted(cache.glob("models--*--*")):
        model_id = repo.name[len("models--"):].replace("--", "/", 1)
        if snapshot_dir(cache, model_id) is not None:
            out.append(model_id)
    return out


def link_hub_cache(cache: pathlib.Path, view: pathlib.Path) -> dict[str, pathlib.Path]:
    """Make ``view`` a models folder in the engine's layout over the Hub cache: ``<view>/<org>/<name>`` is a link
    to the cached snapshot of ``org/name`` (remade at each start: a new revision replaces the old link). Real
    folders already in ``view`` (the demo's files, downloads) are left alone. Returns {model_id: snapshot}."""
    view = pathlib.Path(view)
    view.mkdir(parents=True, exist_ok=True)
    linked = {}
    for model_id in cached_models(cache):
        target = snapshot_dir(cache, model_id)
        link = view / model_id
        if link.exists() and not link.is_symlink():
            continue                       # a real folder someone put there wins
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            if pathlib.Path(os.readlink(link)) == target:
                linked[model_id] = target
                continue
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
        linked[model_id] = target
    return linked


def space_models_dir(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    """The models folder on a Space: the links folder over the Hub cache (made or refreshed now), inside the Hub
    cache's parent (HF_HOME), which the Space already writes to."""
    cache = hub_cache(environ)
    view = cache.parent / VIEW_FOLDER
    link_hub_cache(cache, view)
    return view


def space_host_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The host names the Space's page is served under (SPACE_HOST: ``owner-name.hf.space``), for the studio's host
    check; [] off a Space."""
    return [h.strip() for h in (environ.get("SPACE_HOST") or "").split(",") if h.strip()] if on_space(environ) else []
