"""What a person reads about an image: its recipe as text (the A1111-style settings, then the reference images,
EliGen's entities, the LoRAs and the model files). Used by the results gallery and the image-info panel.
"""
from __future__ import annotations

from typing import Any

from studio import recipes

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
        ref_lines = reference_recipe_lines(recipe) + entity_recipe_lines(recipe)
        if ref_lines:
            lines.append("")
            lines.extend(ref_lines)
        lora_lines = lora_recipe_lines(recipe.get("loras"))
        if lora_lines:
            lines.append("")
            lines.extend(lora_lines)
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


REFERENCE_KEYS = {"kontext_images": "Kontext reference", "step1x_reference_image": "Step1X-Edit reference",
                  "inpaint_image": "Image to inpaint", "inpaint_mask": "Mask"}


def reference_recipe_lines(recipe: dict) -> list[str]:
    """The recipe's reference images (editing): file, size, fingerprint and the copy saved beside the image."""
    lines: list[str] = []
    for key, label in REFERENCE_KEYS.items():
        entries = recipe.get(key)
        if not entries:
            continue
        for i, entry in enumerate(entries if isinstance(entries, (list, tuple)) else [entries]):
            if not isinstance(entry, dict):
                lines.append(f"  {label}: {entry}")
                continue
            parts = [f"  {label}{f' {i + 1}' if isinstance(entries, (list, tuple)) and len(entries) > 1 else ''}: "
                     f"{entry.get('file') or '?'}"]
            size = entry.get("size")
            if isinstance(size, (list, tuple)) and len(size) == 2:
                parts.append(f"{size[0]}x{size[1]} as used")
            if entry.get("copy"):
                parts.append(f"copy saved as <image name>{entry['copy']}")
            line = " · ".join(parts)
            if entry.get("fingerprint"):
                line += f"  [{entry['fingerprint']}]"
            lines.append(line)
    if recipe.get("inpaint_mask"):
        lines.append(f"  Mask: {'inverted, ' if recipe.get('mask_invert') else ''}feather "
                     f"{recipe.get('mask_feather', 0)} px; the original is kept outside it")
    for i, c in enumerate(recipe.get("controls") or []):
        if isinstance(c, dict):
            lines.append(f"  Control {i + 1}: {c.get('file', '?')} · {c.get('preprocessor', 'none')} · "
                         f"{c.get('controlnet') or 'Flex.2 control'} · strength {c.get('scale')} · steps "
                         f"{c.get('start', 0)}–{c.get('end', 1)} · copy <image name>{c.get('copy', '')}")
    return ["Reference images:", *lines] if lines else []


def entity_recipe_lines(recipe: dict) -> list[str]:
    """EliGen's entities: each prompt with its mask's copy beside the image (so the layout can be redone)."""
    prompts = recipe.get("eligen_entity_prompts") or []
    if not prompts:
        return []
    masks = recipe.get("eligen_entity_masks") or []
    lines = ["Entities (EliGen regional prompts):"]
    for k, prompt in enumerate(prompts):
        entry = masks[k] if k < len(masks) and isinstance(masks[k], dict) else {}
        lines.append(f"  {k + 1}: {prompt}  · mask <image name>{entry.get('copy', '?')}")
    flags = [name for key, name in (("eligen_enable_on_negative", "on the negative prompt too"),
                                    ("eligen_enable_inpaint", "inpainted into the input (<image name>.input.png)"))
             if recipe.get(key)]
    if flags:
        lines.append("  Regions applied " + "; ".join(flags))
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
