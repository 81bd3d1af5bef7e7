"""Shared widgets: the results gallery (session history, newest first, with the selected image's recipe) and the
image-info panel (drop a PNG, read its recipe, restore the settings into a tab's controls).

Any tab can use them: it hands over a mapping from request keys ("prompt", "width", ...) to its own controls.
No torch here; the recipe reader (engine/recipe.py, Pillow only) is imported when first needed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

# The request keys a restore can fill, in the order the restore handlers return them.
RESTORE_KEYS = (
    "variant",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_inference_steps",
    "embedded_guidance",
    "cfg_scale",
    "seed",
)
NO_RECIPE = "No generation settings found in this image (it was not made by FLUX Studio, A1111 or Forge)."


def _recipes():
    from engine import recipe  # noqa: PLC0415 - Pillow only, loaded on first use

    return recipe


# ----------------------------------------------------------------------------------------------------------------
# Recipe text
# ----------------------------------------------------------------------------------------------------------------

def recipe_text(recipe: dict | None, path: str | None = None, parameters: str | None = None) -> str:
    """What a person reads about an image: the A1111-style settings, then our extra details (model files)."""
    if not recipe and not parameters:
        return NO_RECIPE
    recipes = _recipes()
    lines: list[str] = []
    if recipe and recipe.get("source") != "a1111":
        lines.append(recipes.a1111_parameters(recipe))
        if recipe.get("size_note"):
            lines.append(f"Size note: {recipe['size_note']}")
        if path:
            lines.append(f"File: {path}")
            path = None
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
            else:
                if value:
                    gr.Info(f"The image was made with {value}, which is not in the model list; the model was kept.")
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


# ----------------------------------------------------------------------------------------------------------------
# Results gallery
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ResultsPanel:
    """The session's images, newest first, and the recipe of the selected one."""

    gallery: gr.Gallery
    info: gr.Textbox
    restore: gr.Button
    history: gr.State      # list of result dicts (path, seed, width, height, recipe, info), newest first
    selected: gr.State     # the selected result dict (or None)


def caption(result: dict) -> str:
    return f"seed {result.get('seed')} · {result.get('width')}×{result.get('height')}"


def gallery_value(history: list[dict]) -> list[tuple[str, str]]:
    return [(item["path"], caption(item)) for item in history]


def result_info(result: dict | None) -> str:
    if not result:
        return ""
    recipe = result.get("recipe")
    text = recipe_text(recipe, path=result.get("path")) if recipe else (result.get("info") or "")
    return text


def build_results_panel(label: str = "Results", height: int | str = 560) -> ResultsPanel:
    gallery = gr.Gallery(
        label=label,
        show_label=False,
        columns=4,
        height=height,
        object_fit="contain",
        preview=True,
        allow_preview=True,
        interactive=False,
        buttons=["download", "fullscreen"],
        elem_id="results-gallery",
    )
    with gr.Group(elem_classes=["info-group"]):
        info = gr.Textbox(
            label="Image info",
            lines=5,
            max_lines=14,
            interactive=False,
            buttons=["copy"],
            placeholder="The settings of the selected image appear here.",
            elem_id="selected-info",
            elem_classes=["recipe-text"],
        )
        restore = gr.Button("↺ Restore these settings", size="sm", elem_id="restore-selected")
    history = gr.State([])
    selected = gr.State(None)

    def on_select(items: list[dict], evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not items or index is None or not 0 <= index < len(items):
            return gr.update(), None
        return result_info(items[index]), items[index]

    gallery.select(on_select, inputs=[history], outputs=[info, selected], queue=False, api_visibility="private")
    return ResultsPanel(gallery=gallery, info=info, restore=restore, history=history, selected=selected)


def add_results(new: list[dict] | None, history: list[dict] | None):
    """New results go first; the newest image is selected and its recipe shown."""
    history = list(new or []) + list(history or [])
    if not new:
        return gr.update(), history, gr.update(), gr.update()
    return (
        gr.update(value=gallery_value(history), selected_index=0),
        history,
        result_info(new[0]),
        new[0],
    )


# ----------------------------------------------------------------------------------------------------------------
# Image info panel (PNG Info)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageInfoPanel:
    image: gr.Image
    text: gr.Textbox
    restore: gr.Button
    recipe: gr.State       # the dropped image's settings (request keys) or None


def read_dropped(path: str | None, engine: Any = None) -> tuple[str, dict | None]:
    """(text to show, settings to restore) for an image file."""
    if not path:
        return "", None
    recipes = _recipes()
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
    text = recipe_text(full, parameters=texts.get(recipes.PARAMETERS_KEY))
    if full.get("source") == "a1111" and full.get("model") and not full.get("variant"):
        text += f"\nModel {full['model']!r} is not a FLUX model known here; restoring keeps the current model."
    return text, settings


def build_image_info_panel(engine: Any = None) -> ImageInfoPanel:
    with gr.Row(equal_height=False):
        image = gr.Image(
            label="Drop a PNG (made here, in A1111 or in Forge)",
            type="filepath",
            image_mode=None,  # keep the uploaded file as is: converting would drop its metadata
            sources=["upload", "clipboard"],
            height=260,
            elem_id="info-image",
            scale=2,
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

    def on_change(path):
        return read_dropped(path, engine)

    image.change(on_change, inputs=[image], outputs=[text, recipe], queue=False, api_visibility="private")
    return ImageInfoPanel(image=image, text=text, restore=restore, recipe=recipe)


def wire_restore(button: gr.Button, source: gr.State, targets: dict[str, gr.components.Component],
                 known_variants: list[str]) -> None:
    """Clicking ``button`` fills ``targets`` (request key -> control) from the recipe held in ``source``.

    ``source`` holds either a recipe dict or a result dict with a "recipe" entry.
    """
    keys = [k for k in RESTORE_KEYS if k in targets]
    limits = {k: (getattr(targets[k], "minimum", None), getattr(targets[k], "maximum", None)) for k in keys}

    def restore(value):
        recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
        updates = restore_updates(recipe, known_variants, keys, limits)
        if recipe:
            gr.Info("Settings restored.")
        return updates

    button.click(restore, inputs=[source], outputs=[targets[k] for k in keys], queue=False,
                 api_visibility="private")
