"""Image recipes: the settings that made an image, stored in its PNG; the input copies saved beside it; restore.

Pillow only (no torch, no gradio): the studio saves through it and reads dropped files with it.

Every PNG we write carries two text chunks:

* ``flux_studio``: our recipe as JSON (model variant, model files and their fingerprints, LoRAs, every parameter, the
  seed actually used, the real size, the engine version, and each feature's entries: ``job_recipe`` + the features);
* ``parameters``: the same settings in the AUTOMATIC1111 text format (``studio.a1111``), which A1111, Forge, ComfyUI
  readers and Civitai understand.

Reading (``read_recipe``) prefers our JSON chunk and otherwise parses an A1111 ``parameters`` text (PNG text chunk or
JPEG/WebP EXIF UserComment) into the request keys, so a dropped image restores the settings either way. The image
inputs of a job (references, masks, control images) are saved beside the result as ``<name><suffix>`` (``Sidecars``;
the recipe names each suffix), and ``restore`` turns a recipe back into a request that points at those copies.

Output names are ``<outputs>/<YYYY-MM-DD>/<NNNNN>-<seed>.png``. The whole PNG is written under a temporary
name and hard-linked to its name (``safe_files``), so an existing file is never overwritten, even when several threads
or processes save at once, and a crash never leaves a torn image.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import pathlib
import re
import threading
from typing import Any, Iterable, Optional

from PIL import Image, PngImagePlugin

from engine import safe_files
from engine.acceleration.settings import AccelerationSettings

from .a1111 import a1111_parameters, parse_a1111_parameters, variant_for_model_name

__all__ = [
    "RECIPE_KEY",
    "PARAMETERS_KEY",
    "REQUEST_KEYS",
    "ENGINE_VERSION",
    "save_image",
    "read_recipe",
    "read_text_chunks",
    "a1111_parameters",
    "parse_a1111_parameters",
    "output_path_for",
    "sha256_prefix",
    "variant_for_model_name",
    "Sidecars",
    "sidecar",
    "job_recipe",
    "restore",
]

RECIPE_KEY = "flux_studio"
PARAMETERS_KEY = "parameters"
ENGINE_VERSION = "0.1.0"
# The keys of a request that every tab can restore; read_recipe's result always has the ones it could find among these.
REQUEST_KEYS = (
    "variant",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_inference_steps",
    "embedded_guidance",
    "cfg_scale",
    "seed",
    "num_images",
)
# The base settings a recipe stores as they were used (beside the seed, the model files and the LoRAs).
RECIPE_SETTINGS = ("variant", "prompt", "negative_prompt", "width", "height", "num_inference_steps",
                   "embedded_guidance", "cfg_scale", "t5_sequence_length", "schedule", "sigma_shift", "rand_device")

# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------

def _decode_user_comment(raw: Any) -> str | None:
    """EXIF UserComment (A1111 JPEG/WebP): 8-byte charset header + text."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, bytearray)):
        return None
    data = bytes(raw)
    head, body = data[:8], data[8:]
    if head.startswith(b"UNICODE"):
        # piexif writes UTF-16 big endian; some writers use little endian.
        # piexif writes UTF-16 big endian, some writers little endian: ASCII text then shows as NULs in the high bytes.
        encoding = "utf-16-le" if body[1:2] == b"\x00" and body[:1] != b"\x00" else "utf-16-be"
        return body.decode(encoding, errors="replace").rstrip("\x00")
    if head.startswith(b"ASCII") or head.startswith(b"\x00" * 8):
        return body.decode("latin-1", errors="replace").rstrip("\x00")
    return data.decode("utf-8", errors="replace").rstrip("\x00")


def read_text_chunks(path_or_image: Any) -> dict[str, str]:
    """The image's text metadata (PNG tEXt/iTXt/zTXt chunks, plus an EXIF UserComment as "parameters")."""
    image, opened = _open(path_or_image)
    if image is None:
        return {}
    try:
        texts: dict[str, str] = {}
        chunk_text = getattr(image, "text", None)  # PNG: loads chunks after IDAT too
        if isinstance(chunk_text, dict):
            texts.update({str(k): str(v) for k, v in chunk_text.items()})
        for key, value in (image.info or {}).items():
            if isinstance(value, str) and key not in texts:
                texts[str(key)] = value
        if PARAMETERS_KEY not in texts:
            try:
                exif = image.getexif()
                comment = exif.get_ifd(0x8769).get(0x9286) if exif else None
            except Exception:  # noqa: BLE001 - odd EXIF is not our problem: just no recipe
                comment = None
            text = _decode_user_comment(comment)
            if text:
                texts[PARAMETERS_KEY] = text
        return texts
    finally:
        if opened:
            image.close()


def _open(path_or_image: Any) -> tuple[Image.Image | None, bool]:
    if path_or_image is None:
        return None, False
    if isinstance(path_or_image, Image.Image):
        return path_or_image, False
    try:
        if isinstance(path_or_image, (bytes, bytearray)):
            return Image.open(io.BytesIO(path_or_image)), True
        return Image.open(os.fspath(path_or_image)), True
    except (OSError, ValueError, TypeError):
        return None, False


def read_recipe(path_or_image: Any) -> dict | None:
    """The settings an image was made with, or None when it carries none.

    Accepts a path, a PIL image or the file's bytes. Our own PNGs give back exactly the recipe dict that was saved.
    Other tools' images (an A1111 ``parameters`` chunk, or the EXIF comment of a JPEG/WebP) give
    ``parse_a1111_parameters``' dict (the request keys found, plus ``source``, ``model``, ``extra``).
    """
    texts = read_text_chunks(path_or_image)
    raw = texts.get(RECIPE_KEY)
    if raw:
        try:
            recipe = json.loads(raw)
        except ValueError:
            recipe = None
        if isinstance(recipe, dict):
            return recipe
    if texts.get(PARAMETERS_KEY):
        return parse_a1111_parameters(texts[PARAMETERS_KEY])
    return None


# --------------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"^(\d{5,})-")
_counter_lock = threading.Lock()
_last_number: dict[str, int] = {}


def _next_number(directory: pathlib.Path) -> int:
    """One past the highest NNNNN- prefix in the folder (a hint: the exclusive link is what guarantees uniqueness)."""
    highest = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _NUMBER_RE.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
    except FileNotFoundError:
        pass
    key = str(directory)
    with _counter_lock:
        number = max(highest + 1, _last_number.get(key, 0) + 1)
        _last_number[key] = number
    return number


def _safe_seed(seed: Any) -> str:
    text = str(seed) if seed is not None else "x"
    return re.sub(r"[^0-9A-Za-z_-]", "_", text)[:24] or "x"


def output_path_for(outputs_dir: Any, seed: Any, number: int, day: str | None = None) -> pathlib.Path:
    day = day or _dt.datetime.now().strftime("%Y-%m-%d")
    return pathlib.Path(outputs_dir) / day / f"{number:05d}-{_safe_seed(seed)}.png"


def _pnginfo(recipe: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(recipe))
    # ASCII JSON -> a plain tEXt chunk any reader can see.
    info.add_text(RECIPE_KEY, json.dumps(recipe, ensure_ascii=True, sort_keys=True, default=str))
    info.add_text("Software", "FLUX Studio")
    return info


def save_image(image: Image.Image, recipe: dict, outputs_dir: Any) -> pathlib.Path:
    """Save ``image`` as ``<outputs_dir>/<today>/<NNNNN>-<seed>.png`` with the recipe in its metadata; return the path.

    The PNG is written whole under a temporary name, flushed, then linked to a free name (``safe_files``): a crash
    never leaves a torn image, and a name that is taken (a file put there by hand, another thread, another process)
    is never overwritten: the next number is tried.
    """
    if not isinstance(recipe, dict):
        raise TypeError("recipe must be a dict")
    # Encode first: the whole PNG is written at once.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_pnginfo(recipe))
    data = buffer.getvalue()

    day = _dt.datetime.now().strftime("%Y-%m-%d")
    directory = pathlib.Path(outputs_dir) / day
    directory.mkdir(parents=True, exist_ok=True)
    number = _next_number(directory)
    for _ in range(100000):
        path = output_path_for(outputs_dir, recipe.get("seed"), number, day)
        try:
            safe_files.write_bytes(path, data, exclusive=True)
        except FileExistsError:
            number += 1
            continue
        with _counter_lock:
            key = str(directory)
            _last_number[key] = max(_last_number.get(key, 0), number)
        return path
    raise OSError(f"could not find a free output name in {directory}")


# --------------------------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------------------------

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def sha256_prefix(path: Any, length: int = 12) -> str:
    """The first ``length`` hex digits of the file's sha256 (cached per path, size and mtime: big files hash once)."""
    path = os.fspath(path)
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        cached = digest.hexdigest()
        with _hash_lock:
            _hash_cache[key] = cached
    return cached[:length]


# --------------------------------------------------------------------------------------------------------------------
# A job's recipe and the input copies beside its result
# --------------------------------------------------------------------------------------------------------------------

def _relative(path, base) -> str:
    try:
        return pathlib.Path(path).resolve().relative_to(pathlib.Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)


def job_recipe(job, seed: int, model_files: dict, loras=(), models_dir: Any = ".",
               acceleration: Optional[dict] = None) -> dict:
    """The base part of a result's recipe (a ``ValidJob``'s settings, the seed, the model files with their
    fingerprints, the LoRAs as attached, the speed settings when any is on: ``acceleration``, what
    ``pipe.acceleration.in_force()`` says); each feature adds its entries."""
    from engine.fingerprints import fingerprint
    files = {role: [{"file": _relative(p, models_dir), "fingerprint": fingerprint(p)} for p in paths]
             for role, paths in model_files.items()}
    settings = job.settings
    recipe = {k: getattr(settings, k) for k in RECIPE_SETTINGS}
    recipe.update(variant=job.variant.name, width=job.width, height=job.height)
    if not job.variant.uses_guidance:
        del recipe["embedded_guidance"]      # no guidance embedder: the value did nothing
    recipe.update(seed=seed, model_files=files, app="FLUX Studio", engine_version=ENGINE_VERSION)
    if loras:
        recipe["loras"] = [dict(item, name=item["file"]) for item in loras]
    if job.size_note:
        recipe["size_note"] = job.size_note
    if acceleration and acceleration != ACCELERATION_DEFAULTS:
        recipe["acceleration"] = dict(acceleration)
    return recipe


# The speed settings a recipe leaves out when all are these (engine.acceleration.settings' defaults).
ACCELERATION_DEFAULTS = AccelerationSettings().as_dict()


def acceleration_of(recipe: Optional[dict]) -> dict:
    """The speed settings an image was made with (the defaults when its recipe names none): what
    ``ModelCache.set_acceleration`` takes to make it again the same way."""
    found = (recipe or {}).get("acceleration")
    found = found if isinstance(found, dict) else {}
    return {k: found.get(k, v) for k, v in ACCELERATION_DEFAULTS.items()}


def beside(result: Any, suffix: str) -> pathlib.Path:
    """``<result stem><suffix>`` in the result's folder."""
    result = pathlib.Path(str(result))
    return result.with_name(result.stem + suffix)


def sidecar(result: Any, suffix: Any) -> Optional[pathlib.Path]:
    """The copy saved beside a result (``<result stem><suffix>``, e.g. ``.ref0.png``) when it is a whole image; None
    when missing, torn or not an image (a recipe names only plain suffixes: anything with a path in it is ignored)."""
    if not isinstance(suffix, str) or not suffix.startswith(".") or "/" in suffix or "\\" in suffix:
        return None
    return safe_files.whole_image(beside(result, suffix))


class Sidecars:
    """The input copies of one result, saved beside it as ``<result stem><suffix>``: a feature adds each image while
    it writes its recipe entries, which name the suffix, so that a restore finds them."""

    def __init__(self):
        self._copies: list = []
        self._counts: dict = {}

    def add(self, image: Image.Image, kind: str = "ref", suffix: Optional[str] = None) -> str:
        """Keep ``image`` for the result; returns its suffix: the next ``.<kind><n>.png`` unless ``suffix`` is given."""
        if suffix is None:
            n = self._counts.get(kind, 0)
            self._counts[kind] = n + 1
            suffix = f".{kind}{n}.png"
        self._copies.append((suffix, image))
        return suffix

    def save(self, result_path: Any) -> None:
        """Write the copies (each whole or not at all: ``safe_files``)."""
        for suffix, image in self._copies:
            safe_files.save_image(image, beside(result_path, suffix))


def restore(path: Any, base_keys: Iterable[str], features: Iterable) -> Optional[dict]:
    """The request that redoes the image at ``path`` (made here, or by A1111/Forge: what they record): the base
    settings in ``base_keys`` and each feature's keys (``Feature.restore``: its inputs point at the copies beside
    the image). A feature's own LoRA (EliGen's) comes back with the feature, not in the LoRAs. None: no recipe."""
    found = read_recipe(path)
    if not found:
        return None
    out = {k: found[k] for k in base_keys if k in found}
    if "loras" in out:
        out["loras"] = [{"name": item.get("name") or item.get("file"), "weight": item.get("weight", 1.0)}
                        for item in out["loras"] if isinstance(item, dict) and not item.get("feature")]
    for feature in features:
        out.update(feature.restore(found, pathlib.Path(str(path))))
    return out
