"""What a person reads about an image: its recipe as text (the A1111-style settings, then each feature's inputs as
it words them, the LoRAs and the model files). Used by the results gallery and the image-info panel.
"""
from __future__ import annotations

from typing import Any

from studio import recipes
from studio.features import FEATURES

NO_RECIPE = "No generation settings found in this image (it was not made by FLUX Studio, A1111 or Forge)."


def recipe_text(recipe: dict | None, path: str | None = None, parameters: str | None = None) -> str:
    """What a person reads about an image: the A1111-style settings, then our extra details (model files)."""
    if not recipe and not parameters:
        return NO_RECIPE
    lines: list[str] = []
    if recipe and recipe.get("source") != "a1111":
        lines.append(recipes.a1111_parameters(recipe))
        if recipe.get("size_note"):
            lines.append(f"Size note: {recipe['size_note']}")
        if path:
            lines.append(f"File: {path}")
            path = None
        ref_lines = feature_recipe_lines(recipe)
        if ref_lines:
            lines.append("")
            lines.extend(ref_lines)
        lora_lines = lora_recipe_lines(recipe.get("loras"))
        if lora_lines:
            lines.append("")
            lines.extend(lora_lines)
        speed = speed_line(recipe.get("acceleration"))
        if speed:
            lines.append(speed)
        files = recipe.get("model_files")
        if isinstance(files, dict) and files:
            lines.append("")
            lines.append("Model files:")
            for role, entries in files.items():
                for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
                    if isinstance(entry, dict):
                        name = entry.get("file") or entry.get("path") or ""
                        tag = entry.get("sha256") or entry.get("fingerprint") or ""
                        lines.append(f"  {role}: {name}" + (f"  [{tag}]" if tag else ""))
                    else:
                        lines.append(f"  {role}: {entry}")
    else:
        lines.append(parameters or recipes.a1111_parameters(recipe or {}))
        lines.append("")
        lines.append("(read from the A1111/Forge 'parameters' text)")
    if path:
        lines.append(f"File: {path}")
    return "\n".join(lines)


def speed_line(acceleration: Any) -> str:
    """"Speed: step cache 0.3, attention sdpa" for the speed settings an image was made with ("" for none)."""
    if not isinstance(acceleration, dict):
        return ""
    words = {"compile": lambda v: f"compiled ({v})" if v is not True else "compiled",
             "attention_backend": lambda v: f"attention {v}", "fp8_compute": lambda v: "fp8 compute",
             "step_cache": lambda v: f"step cache {v:g}" if isinstance(v, (int, float)) else f"step cache {v}"}
    used = [words[k](v) for k, v in acceleration.items()
            if k in words and v not in (None, False, 0, 0.0, "auto", "")]
    return f"Speed: {', '.join(used)}" if used else ""


def feature_recipe_lines(recipe: dict) -> list[str]:
    """Each feature's inputs as recorded (reference images, masks, controls, entities, image prompts), as it words
    them (``Feature.describe``); a heading two features share is written once."""
    lines: list[str] = []
    for feature in FEATURES:
        part = feature.describe(recipe)
        if part and part[0] in lines:
            part = part[1:]
        lines.extend(part)
    return lines


def lora_recipe_lines(loras: Any) -> list[str]:
    """The recipe's LoRAs for people: file, weight, format, fingerprint; one line each."""
    if not loras:
        return []
    lines = ["LoRAs:"]
    for entry in loras if isinstance(loras, (list, tuple)) else [loras]:
        if isinstance(entry, dict):
            name = entry.get("file") or entry.get("name") or entry.get("path") or "?"
            weight = entry.get("weight", entry.get("scale", entry.get("alpha")))
            parts = [f"  {name}"]
            if weight is not None:
                try:
                    parts.append(f"weight {float(weight):g}")
                except (TypeError, ValueError):
                    parts.append(f"weight {weight}")
            if entry.get("format"):
                parts.append(f"format {entry['format']}")
            line = " · ".join(parts)
            tag = entry.get("fingerprint") or entry.get("sha256") or entry.get("hash")
            lines.append(line + (f"  [{tag}]" if tag else ""))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            lines.append(f"  {entry[0]} · weight {entry[1]}")
        else:
            lines.append(f"  {entry}")
    return lines


def result_info(result: dict | None) -> str:
    if not result:
        return ""
    recipe = result.get("recipe")
    text = recipe_text(recipe, path=result.get("path")) if recipe else (result.get("info") or "")
    return text
