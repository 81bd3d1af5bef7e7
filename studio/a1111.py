"""The AUTOMATIC1111 ``parameters`` text: what A1111, Forge, ComfyUI readers and Civitai read from an image.

Writing (``a1111_parameters``) turns a studio recipe into the text; reading (``parse_a1111_parameters``) turns another
tool's text into the studio's request keys::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 30, Sampler: Euler (flow), Schedule type: Flow shift 3, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 42, Size: 1024x1024, Model: flux1-dev, ...

Pure Python (``studio.recipes`` stores the text in PNGs and reads it back).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

__all__ = ["a1111_parameters", "parse_a1111_parameters", "variant_for_model_name"]

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
        if stem.lower() == "diffusion_pytorch_model" and recipe.get("variant"):
            stem = str(recipe["variant"])       # a diffusers folder's generic file name (FLUX.2): the model's name
        if stem:
            return stem, digest
    variant = recipe.get("variant")
    return (str(variant) if variant else "flux"), None


def _schedule_text(recipe: dict) -> str:
    """The schedule for people: the engine stores "seed" (static shift, 3 unless sigma_shift) or "bfl"."""
    schedule = recipe.get("schedule") or recipe.get("scheduler") or "seed"
    shift = recipe.get("sigma_shift", recipe.get("shift"))
    if str(recipe.get("variant") or "").startswith("FLUX.2"):
        return "FLUX.2 flow (resolution-dependent shift)"     # the seed's FLUX.2 schedule: no fixed shift
    if str(recipe.get("variant") or "").startswith("FLUX.3"):
        return "FLUX 3 flow (alpha 6.93)"                     # sigma = a*u / (1 + (a-1)*u), no resolution shift
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
