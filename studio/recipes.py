"""Image recipes: the settings that made an image, stored in its PNG, and the names outputs get.

Pure Python + Pillow (no torch, no gradio): the engine saves through it, the studio reads dropped files with it.

Every PNG we write carries two text chunks:

* ``flux_studio``: our recipe as JSON, exactly the dict the engine passed (model variant, model files and their
  sha256-prefix hashes, LoRAs, every parameter, the seed actually used, the real size, the engine version);
* ``parameters``: the same settings in the AUTOMATIC1111 text format, which A1111, Forge, ComfyUI readers and
  Civitai understand::

      <prompt>
      Negative prompt: <negative prompt>
      Steps: 30, Sampler: Euler (flow), Schedule type: Flow shift 3, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 42, Size: 1024x1024, Model: flux1-dev, ...

Reading (``read_recipe``) prefers our JSON chunk and otherwise parses an A1111 ``parameters`` text (PNG text chunk or
JPEG/WebP EXIF UserComment) into the engine's request keys, so a dropped image restores the settings either way.

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
from typing import Any

from PIL import Image, PngImagePlugin

from engine import safe_files

__all__ = [
    "RECIPE_KEY",
    "PARAMETERS_KEY",
    "REQUEST_KEYS",
    "save_image",
    "read_recipe",
    "read_text_chunks",
    "a1111_parameters",
    "parse_a1111_parameters",
    "output_path_for",
    "sha256_prefix",
    "variant_for_model_name",
]

RECIPE_KEY = "flux_studio"
PARAMETERS_KEY = "parameters"
# The keys of an engine request; read_recipe's result always has the ones it could find among these.
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

# Model file stems / names other tools write in "Model:" -> our variant names.
_MODEL_NAME_TO_VARIANT = {
    "flux1-dev": "FLUX.1-dev",
    "flux.1-dev": "FLUX.1-dev",
    "flux1-krea-dev": "FLUX.1-Krea-dev",
    "flux.1-krea-dev": "FLUX.1-Krea-dev",
    "flux1-kontext-dev": "FLUX.1-Kontext-dev",
    "flux.1-kontext-dev": "FLUX.1-Kontext-dev",
    "flux1-schnell": "FLUX.1-schnell",
    "flux.1-schnell": "FLUX.1-schnell",
}


# --------------------------------------------------------------------------------------------------------------------
# A1111 text
# --------------------------------------------------------------------------------------------------------------------

def _quote(value: Any) -> str:
    """A1111 writes a value in double quotes (JSON string escaping) when it holds a separator."""
    text = str(value)
    if any(ch in text for ch in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _fmt_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _file_entry(item: Any, role: str = "") -> tuple[str, str, str | None] | None:
    """(role, file name, sha256-or-None) from one model-file entry: a dict or a plain path."""
    if isinstance(item, dict):
        name = item.get("file") or item.get("path") or item.get("name") or item.get("origin_file_pattern") or ""
        # Only a real sha256 is an A1111 "Model hash"; the engine's quick fingerprint is not comparable with it.
        digest = item.get("sha256") or item.get("hash")
        return (str(item.get("role") or role), str(name), None if digest is None else str(digest))
    if isinstance(item, (str, os.PathLike)):
        return (role, os.fspath(item), None)
    return None


def _model_files(recipe: dict) -> list[tuple[str, str, str | None]]:
    """The recipe's model files as (role, file, sha256-or-None), whatever shape the engine used:
    {role: [entry, ...]} (the engine's), {role: entry}, [entry, ...] or {file: sha256}; an entry is a dict with
    "file"/"path"/"name" and optionally "sha256"/"hash", or a plain path."""
    files = recipe.get("model_files") or recipe.get("files") or []
    out: list[tuple[str, str, str | None]] = []
    if isinstance(files, dict):
        for key, value in files.items():
            if isinstance(value, (list, tuple)):
                entries = [_file_entry(item, str(key)) for item in value]
            elif isinstance(value, dict):
                entries = [_file_entry(value, str(key))]
            else:  # {file: sha256}
                entries = [("", str(key), None if value is None else str(value))]
            out.extend(e for e in entries if e is not None)
    elif isinstance(files, (list, tuple)):
        out.extend(e for e in (_file_entry(item) for item in files) if e is not None)
    return out


_MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _strip_model_suffix(name: str) -> str:
    for suffix in _MODEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _main_model(recipe: dict) -> tuple[str, str | None]:
    """The name other tools show as "Model" (the diffusion model's file stem) and its sha256, if known."""
    files = _model_files(recipe)
    denoiser_roles = ("dit", "transformer", "denoiser", "unet")
    ordered = [f for f in files if f[0] in denoiser_roles] + [f for f in files if f[0] not in denoiser_roles]
    for role, name, digest in ordered:
        posix = name.replace("\\", "/")
        low = posix.lower()
        if role not in denoiser_roles and (
            role or any(part in low for part in ("text_encoder", "tokenizer", "ae.safetensors", "vae"))
        ):
            continue
        stem = _strip_model_suffix(pathlib.PurePosixPath(posix).name)
        if stem:
            return stem, digest
    variant = recipe.get("variant")
    return (str(variant) if variant else "flux"), None


def _schedule_text(recipe: dict) -> str:
    """The schedule for people: the engine stores "seed" (static shift, 3 unless sigma_shift) or "bfl"."""
    schedule = recipe.get("schedule") or recipe.get("scheduler") or "seed"
    shift = recipe.get("sigma_shift", recipe.get("shift"))
    if schedule == "seed":
        return f"Flow shift {_fmt_number(shift) if shift is not None else 3}"
    if schedule == "bfl":
        return "Flow shift resolution-dependent" + (f" mu {_fmt_number(shift)}" if shift is not None else "")
    return str(schedule)


def a1111_parameters(recipe: dict) -> str:
    """The recipe as an AUTOMATIC1111 ``parameters`` text (prompt, optional negative prompt line, settings line)."""
    lines = [str(recipe.get("prompt") or "")]
    negative = recipe.get("negative_prompt") or ""
    if negative:
        lines.append(f"Negative prompt: {negative}")

    fields: list[tuple[str, Any]] = []

    def add(key: str, value: Any) -> None:
        if value is None or value == "":
            return
        fields.append((key, value))

    add("Steps", recipe.get("num_inference_steps"))
    add("Sampler", recipe.get("sampler") or "Euler (flow)")
    add("Schedule type", _schedule_text(recipe))
    add("CFG scale", _fmt_number(recipe["cfg_scale"]) if recipe.get("cfg_scale") is not None else None)
    add(
        "Distilled CFG Scale",
        _fmt_number(recipe["embedded_guidance"]) if recipe.get("embedded_guidance") is not None else None,
    )
    add("Seed", recipe.get("seed"))
    if recipe.get("width") and recipe.get("height"):
        add("Size", f"{int(recipe['width'])}x{int(recipe['height'])}")
    model_name, model_hash = _main_model(recipe)
    if model_hash:
        add("Model hash", str(model_hash)[:10])
    add("Model", model_name)
    if recipe.get("variant"):
        add("Variant", recipe["variant"])
    if recipe.get("denoising_strength") is not None:
        add("Denoising strength", _fmt_number(recipe["denoising_strength"]))
    loras = recipe.get("loras") or []
    if loras:
        names, hashes = [], []
        for lora in loras:
            if isinstance(lora, dict):
                name = pathlib.PurePosixPath(str(lora.get("path") or lora.get("name") or lora.get("file") or "lora").replace("\\", "/"))
                stem = name.name.rsplit(".", 1)[0]
                names.append(f"{stem}:{_fmt_number(lora.get('scale', lora.get('weight', 1.0)))}")
                if lora.get("sha256") or lora.get("hash"):
                    hashes.append(f"{stem}: {str(lora.get('sha256') or lora.get('hash'))[:10]}")
            else:
                names.append(str(lora))
        add("LoRAs", ", ".join(names))
        if hashes:
            add("Lora hashes", ", ".join(hashes))
    version = recipe.get("engine_version") or recipe.get("version")
    add("Version", f"FLUX Studio {version}" if version else "FLUX Studio")

    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


# One "Key: value" pair of the settings line; a value is either a JSON-quoted string or runs to the next comma.
_PARAM_RE = re.compile(r'\s*([A-Za-z][\w \-/]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def _parse_settings_line(line: str) -> dict[str, str] | None:
    """The trailing "Steps: 30, Sampler: ..." line as a dict, or None when the line is not one."""
    result: dict[str, str] = {}
    pos = 0
    line = line.strip()
    while pos < len(line):
        match = _PARAM_RE.match(line, pos)
        if not match or match.end() == pos:
            # A piece that is not "Key: value": skip it (other tools add odd fields), keep reading.
            comma = line.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        result[key] = value
        pos = match.end()
    # A real settings line always names the steps or the seed; a prompt such as "style: watercolor, light: soft" does not.
    return result if ("Steps" in result or "Seed" in result) and len(result) >= 2 else None


def _to_int(text: Any) -> int | None:
    try:
        return int(float(str(text).strip()))
    except (TypeError, ValueError):
        return None


def _to_float(text: Any) -> float | None:
    try:
        return float(str(text).strip())
    except (TypeError, ValueError):
        return None


def variant_for_model_name(name: str | None) -> str | None:
    """Our variant name for a model name/file another tool wrote ("flux1-dev" -> "FLUX.1-dev"), or None."""
    if not name:
        return None
    stem = _strip_model_suffix(pathlib.PurePosixPath(str(name).replace("\\", "/").strip()).name).lower()
    if stem in _MODEL_NAME_TO_VARIANT:
        return _MODEL_NAME_TO_VARIANT[stem]
    # fp8 / quantised re-uploads keep the base name as prefix: flux1-dev-fp8, flux1-dev-Q8_0 ...
    for known in sorted(_MODEL_NAME_TO_VARIANT, key=len, reverse=True):
        if stem.startswith(known + "-") or stem.startswith(known + "_"):
            return _MODEL_NAME_TO_VARIANT[known]
    return None


def parse_a1111_parameters(text: str) -> dict | None:
    """An A1111 ``parameters`` text -> a dict with the engine's request keys.

    Keys found: prompt, negative_prompt, and from the settings line num_inference_steps (Steps), cfg_scale (CFG scale),
    embedded_guidance (Distilled CFG Scale / Guidance), seed, width/height (Size), variant (Variant, or Model when it
    names a FLUX file). Also ``model`` (the Model field as written), ``source`` = "a1111" and ``extra`` (every other
    field, as text). None for an empty text.
    """
    if not text or not str(text).strip():
        return None
    lines = str(text).replace("\r\n", "\n").strip().split("\n")
    settings = _parse_settings_line(lines[-1]) if lines else None
    if settings is not None:
        lines = lines[:-1]
    else:
        settings = {}

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    recipe: dict[str, Any] = {
        "prompt": "\n".join(prompt_lines).strip(),
        "negative_prompt": "\n".join(negative_lines).strip(),
        "source": "a1111",
    }
    consumed = set()

    def take(key: str, target: str, conv) -> None:
        if key in settings and target not in recipe:
            value = conv(settings[key])
            if value is not None:
                recipe[target] = value
            consumed.add(key)

    take("Steps", "num_inference_steps", _to_int)
    take("CFG scale", "cfg_scale", _to_float)
    take("Distilled CFG Scale", "embedded_guidance", _to_float)
    take("Guidance", "embedded_guidance", _to_float)
    take("Seed", "seed", _to_int)
    if "Size" in settings:
        match = _SIZE_RE.match(settings["Size"])
        if match:
            recipe["width"], recipe["height"] = int(match.group(1)), int(match.group(2))
        consumed.add("Size")
    if "Variant" in settings:
        recipe["variant"] = settings["Variant"]
        consumed.add("Variant")
    if "Model" in settings:
        recipe["model"] = settings["Model"]
        consumed.add("Model")
        if "variant" not in recipe:
            variant = variant_for_model_name(settings["Model"])
            if variant:
                recipe["variant"] = variant
    recipe["extra"] = {k: v for k, v in settings.items() if k not in consumed}
    return recipe


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
