"""Restoring an image's settings into a tab's controls, and the image-info panel (drop a PNG made here, in A1111
or in Forge: read its recipe, restore it).

A tab hands over a mapping from request keys ("prompt", "width", ...) to its own controls; the LoRA picker restores
the recipe's LoRAs itself (``app.lora_picker.wire_lora_restore``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from app import uploads
from app.recipe_text import NO_RECIPE, recipe_text
from studio import recipes
from studio.recipes import REQUEST_KEYS

# The request keys a restore can fill, in the order the restore handlers return them (the count of images is
# a per-run choice, not part of an image's recipe).
RESTORE_KEYS = tuple(k for k in REQUEST_KEYS if k != "num_images")


def restore_updates(recipe: dict | None, known_variants: list[str], keys=RESTORE_KEYS,
                    limits: dict[str, tuple[float | None, float | None]] | None = None) -> list[Any]:
    """Updates for the controls named by ``keys``: a value where the recipe has one, no change elsewhere.

    A variant this studio does not offer is left as it is, and a message says so. ``limits`` (key -> (min, max))
    keeps values inside the controls' ranges (an A1111 image made with 150 steps sets the slider to its maximum).
    """
    limits = limits or {}
    if not recipe:
        gr.Warning("This image carries no settings to restore.")
        return [gr.update() for _ in keys]
    updates = []
    for key in keys:
        value = recipe.get(key)
        if key == "variant":
            if value in known_variants:
                updates.append(gr.update(value=value))
            else:       # restore_message says so
                updates.append(gr.update())
            continue
        if value is None or (key in ("width", "height") and not value):
            updates.append(gr.update())
            continue
        try:
            if key in ("width", "height", "num_inference_steps", "seed"):
                value = int(value)
            elif key in ("embedded_guidance", "cfg_scale"):
                value = float(value)
        except (TypeError, ValueError):
            updates.append(gr.update())
            continue
        low, high = limits.get(key, (None, None))
        if isinstance(value, (int, float)):
            if low is not None and value < low:
                value = type(value)(low)
            if high is not None and value > high:
                value = type(value)(high)
        updates.append(gr.update(value=value))
    return updates


def restore_message(recipe: dict | None, known_variants: list[str], labels: dict[str, str] | None = None) -> str:
    """What a restore did, in words: which model made the image (the file name another tool wrote, such as
    Forge's "flux1-dev-fp8") and which model is now chosen, saying when it is not downloaded."""
    if not recipe:
        return ""
    labels = labels or {}
    variant, written = recipe.get("variant"), recipe.get("model")
    made_with = f"{written} ({variant})" if written and variant and written != variant else (written or variant)
    if not made_with:
        return "Settings restored (the image names no model; the model was kept)."
    if variant not in known_variants:
        return (f"Settings restored. The image was made with {made_with}, which is not a model this tab offers; "
                f"the model was kept.")
    label = labels.get(variant, variant)
    chosen = label if label.startswith(str(variant)) else f"{variant} ({label})"
    return f"Settings restored. The image was made with {made_with}; the model is now {chosen}."


def model_labels(dropdown: Any) -> dict[str, str]:
    """{name: label} of a model dropdown's choices (labels say downloaded / not downloaded / demo)."""
    out = {}
    for choice in getattr(dropdown, "choices", None) or []:
        label, name = choice if isinstance(choice, (tuple, list)) else (choice, choice)
        out[str(name)] = str(label)
    return out


@dataclasses.dataclass
class ImageInfoPanel:
    image: gr.Image
    text: gr.Textbox
    restore: gr.Button
    recipe: gr.State       # the dropped image's settings (request keys) or None


def settings_of(engine: Any, source: Any) -> dict | None:
    """The settings to restore from ``source``: a result dict ({"path", ...}: its recipe, pointing at the input
    copies beside it) or a dropped image's settings (already a dict); None when there are none to read."""
    settings = source
    if isinstance(source, dict) and source.get("path"):
        try:
            settings = engine.read_recipe(source["path"])
        except Exception:  # noqa: BLE001 - an unreadable result restores nothing
            settings = None
    return settings if isinstance(settings, dict) else None


def number_setting(settings: dict, key: str, default: float) -> float:
    """A numeric setting of a recipe, or ``default`` when it is missing or not a number."""
    value = settings.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def read_dropped(path: str | None, engine: Any = None) -> tuple[str, dict | None]:
    """(text to show, settings to restore) for an image file."""
    if not path:
        return "", None
    texts = recipes.read_text_chunks(path)
    full = recipes.read_recipe(path)
    if not full:
        return NO_RECIPE, None
    settings = None
    if engine is not None and hasattr(engine, "read_recipe"):
        try:
            settings = engine.read_recipe(path)
        except Exception:  # noqa: BLE001 - fall back to the plain reader
            settings = None
    if not settings:
        settings = {k: full[k] for k in RESTORE_KEYS if k in full}
    if full.get("loras"):  # the LoRA picker restores them, and checks the files' fingerprints
        settings = {**settings, "loras": full["loras"]}
    if full.get("source") == "a1111" and full.get("model"):     # the file name Forge wrote, for restore_message
        settings = {**settings, "model": full["model"]}
    text = recipe_text(full, parameters=texts.get(recipes.PARAMETERS_KEY))
    if full.get("source") == "a1111" and full.get("model"):
        text += "\n" + a1111_model_line(full, engine)
    return text, settings


def a1111_model_line(full: dict, engine: Any = None) -> str:
    """What restoring an A1111/Forge image does with its "Model:" (a file name there, such as flux1-dev-fp8)."""
    model, variant = full.get("model"), full.get("variant")
    if not variant:
        return f"Model {model!r} is not a FLUX model known here; restoring keeps the current model."
    info = next((v for v in _variants(engine) if v.get("name") == variant), None)
    if info is None:
        state = ""
    elif info.get("available") or info.get("demo"):
        state = " (downloaded)"
    else:
        state = " (not downloaded: fetched on first use)"
    return f"Model {model!r} is {variant}: restoring chooses {variant}{state}."


def _variants(engine: Any) -> list[dict]:
    try:
        return list(engine.variants()) if engine is not None else []
    except Exception:  # noqa: BLE001 - without the list the line names the model only
        return []


def build_image_info_panel(engine: Any = None) -> ImageInfoPanel:
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=240):
            # A file that is no image is named in a note under the field (NotedImage), not as a bare badge.
            image = uploads.NotedImage(
                label="Drop a PNG (made here, in A1111 or in Forge)",
                type="filepath",
                image_mode=None,  # keep the uploaded file as is: converting would drop its metadata
                sources=["upload", "clipboard"],
                height=260,
                elem_id="info-image",
            )
        with gr.Column(scale=3):
            text = gr.Textbox(
                label="Recipe",
                lines=8,
                max_lines=20,
                interactive=False,
                buttons=["copy"],
                elem_id="info-recipe",
                elem_classes=["recipe-text"],
            )
            restore = gr.Button("↺ Restore settings", variant="secondary", elem_id="info-restore")
    recipe = gr.State(None)

    def on_change(payload):
        return read_dropped(uploads.checked_path(payload), engine)

    # The file as sent (preprocess=False): this may run before the field's own check has emptied a refused file,
    # which it then reads as none (the note names it) instead of showing an "Error" badge on the recipe.
    image.change(on_change, inputs=[image], outputs=[text, recipe], queue=False, preprocess=False,
                 api_visibility="private")
    return ImageInfoPanel(image=image, text=text, restore=restore, recipe=recipe)


def wire_restore(button: gr.Button, source: gr.State, targets: dict[str, gr.components.Component],
                 known_variants: list[str]) -> None:
    """Clicking ``button`` fills ``targets`` (request key -> control) from the recipe held in ``source``.

    ``source`` holds either a recipe dict or a result dict with a "recipe" entry.
    """
    keys = [k for k in RESTORE_KEYS if k in targets]
    limits = {k: (getattr(targets[k], "minimum", None), getattr(targets[k], "maximum", None)) for k in keys}
    labels = model_labels(targets.get("variant"))

    def restore(value):
        recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
        updates = restore_updates(recipe, known_variants, keys, limits)
        if recipe:
            gr.Info(restore_message(recipe, known_variants if "variant" in targets else [], labels))
        return updates

    # Queued (its own slot, never behind a running job): gr.Info / gr.Warning reach the page only from queued events.
    button.click(restore, inputs=[source], outputs=[targets[k] for k in keys], show_progress="hidden",
                 api_visibility="private")
