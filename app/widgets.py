"""Shared widgets: the results gallery (session history, newest first, with the selected image's recipe) and the
image-info panel (drop a PNG, read its recipe, restore the settings into a tab's controls).

Any tab can use them: it hands over a mapping from request keys ("prompt", "width", ...) to its own controls.
No torch here; the recipe reader (engine/recipe.py, Pillow only) is imported when first needed.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import gradio as gr

from app import uploads
from studio.recipes import REQUEST_KEYS

# The request keys a restore can fill, in the order the restore handlers return them (the count of images is
# a per-run choice, not part of an image's recipe).
RESTORE_KEYS = tuple(k for k in REQUEST_KEYS if k != "num_images")
NO_RECIPE = "No generation settings found in this image (it was not made by FLUX Studio, A1111 or Forge)."


def _recipes():
    from studio import recipes  # noqa: PLC0415 - Pillow only, loaded on first use

    return recipes


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


@dataclasses.dataclass
class PromptBar:
    prompt: Any
    negative: Any
    run: Any
    cancel: Any


def build_prompt_bar(prefix: str, label: str = "Prompt", placeholder: str = "", button: str = "Generate",
                     lines: int = 2, max_lines: int = 8, negative_max_lines: int = 4,
                     interactive: bool = True) -> PromptBar:
    """Every image tab's top row: the prompt and negative prompt, and the run / cancel buttons beside them.
    Element ids: #<prefix>-prompt, -negative, -generate, -cancel (and the row #<prefix>-top, #<prefix>-actions)."""
    with gr.Row(equal_height=False, elem_id=f"{prefix}-top"):
        with gr.Column(scale=6, min_width=320):
            prompt = gr.Textbox(value="", label=label, lines=lines, max_lines=max_lines, elem_id=f"{prefix}-prompt",
                                placeholder=placeholder)
            negative = gr.Textbox(value="", label="Negative prompt", lines=1, max_lines=negative_max_lines,
                                  elem_id=f"{prefix}-negative", placeholder="Used only when CFG scale > 1")
        with gr.Column(scale=1, min_width=170, elem_id=f"{prefix}-actions"):
            run = gr.Button(button, variant="primary", size="lg", elem_id=f"{prefix}-generate",
                            interactive=interactive)
            cancel = gr.Button("Cancel", variant="stop", size="lg", visible=False, elem_id=f"{prefix}-cancel")
    return PromptBar(prompt, negative, run, cancel)


CFG_HINT = "CFG scale above 1 turns on true CFG with the negative prompt (each step runs twice: 2× slower)."


def cfg_line(cfg_scale: Any, negative_prompt: str) -> str:
    """The hint under a CFG slider: whether the negative prompt is used, and what it costs."""
    try:
        cfg = float(cfg_scale)
    except (TypeError, ValueError):
        return ""
    if cfg > 1:
        return "True CFG is on: the negative prompt is used, and each step runs twice (about 2× slower)."
    if (negative_prompt or "").strip():
        return "The negative prompt is ignored while CFG scale is 1; raise it above 1 to use it."
    return CFG_HINT


def model_choices(engine: Any, keep: Callable[[dict], Any]) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """A model dropdown's choices (label, name) among the engine's variants that ``keep`` accepts and that are
    downloaded or downloadable: downloaded first, demos last; labels say which is which. Also {name: variant}."""
    variants = [v for v in engine.variants() if keep(v) and (v.get("available") or v.get("downloadable"))]
    variants.sort(key=lambda v: (not v.get("available"), bool(v.get("demo"))))
    choices = []
    for v in variants:
        if v.get("demo"):
            label = v.get("label") or f"{v['name']} (random-weight demo)"
        elif v.get("available"):
            label = f"{v['name']} · downloaded"
        else:
            label = f"{v['name']} · not downloaded (fetched on first use)"
        choices.append((label, v["name"]))
    return choices, {v["name"]: v for v in variants}


def result_info(result: dict | None) -> str:
    if not result:
        return ""
    recipe = result.get("recipe")
    text = recipe_text(recipe, path=result.get("path")) if recipe else (result.get("info") or "")
    return text


def build_results_panel(label: str = "Results", height: int | str = 560, id_prefix: str = "") -> ResultsPanel:
    """The gallery, the selected image's info and a restore button. ``id_prefix`` keeps element ids unique when
    several tabs have one ("edit-" gives #edit-results-gallery, #edit-selected-info, #edit-restore-selected)."""
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
        elem_id=f"{id_prefix}results-gallery",
        elem_classes=["results-gallery"],
    )
    with gr.Group(elem_classes=["info-group"]):
        info = gr.Textbox(
            label="Image info",
            lines=5,
            max_lines=14,
            interactive=False,
            buttons=["copy"],
            placeholder="The settings of the selected image appear here.",
            elem_id=f"{id_prefix}selected-info",
            elem_classes=["recipe-text"],
        )
        restore = gr.Button("↺ Restore these settings", size="sm", elem_id=f"{id_prefix}restore-selected")
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
    if full.get("loras"):  # the LoRA picker restores them, and checks the files' fingerprints
        settings = {**settings, "loras": full["loras"]}
    text = recipe_text(full, parameters=texts.get(recipes.PARAMETERS_KEY))
    if full.get("source") == "a1111" and full.get("model") and not full.get("variant"):
        text += f"\nModel {full['model']!r} is not a FLUX model known here; restoring keeps the current model."
    return text, settings


def build_image_info_panel(engine: Any = None) -> ImageInfoPanel:
    with gr.Row(equal_height=False):
        image = uploads.Image(
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

    # Queued (its own slot, never behind a running job): gr.Info / gr.Warning reach the page only from queued events.
    button.click(restore, inputs=[source], outputs=[targets[k] for k in keys], show_progress="hidden",
                 api_visibility="private")


# ----------------------------------------------------------------------------------------------------------------
# LoRA picker
# ----------------------------------------------------------------------------------------------------------------

MAX_LORAS = 6
LORA_MIN_WEIGHT, LORA_MAX_WEIGHT, LORA_WEIGHT_STEP = -2.0, 2.0, 0.05
LORA_FOLDER = "loras"


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


def list_loras(engine: Any) -> list[dict]:
    """The engine's LoRA files ({"name", "path", "size_mb"}), or [] when it lists none."""
    if engine is None or not hasattr(engine, "loras"):
        return []
    from app.common import call_engine  # noqa: PLC0415

    return list(call_engine(engine.loras, title="Could not list the LoRAs") or [])


def lora_short_name(name: str) -> str:
    """"style/ink.safetensors" -> "style/ink": what the chips and sliders show."""
    return name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name


def lora_label(item: dict) -> str:
    name = lora_short_name(item["name"])
    try:
        size = float(item.get("size_mb"))
    except (TypeError, ValueError):
        return name
    return f"{name} · {size:.0f} MB" if size >= 1 else f"{name} · {max(size * 1024, 1):.0f} KB"


def lora_choices(items: list[dict]) -> list[tuple[str, str]]:
    return [(lora_label(item), item["name"]) for item in items]


def _weight(value: Any, name: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The weight of LoRA {name!r} must be a number, got {value!r}.", print_exception=False) \
            from None
    if weight != weight or abs(weight) == float("inf"):
        raise gr.Error(f"The weight of LoRA {name!r} must be a finite number.", print_exception=False)
    return weight


def parse_loras(value: Any) -> list[dict]:
    """The /generate endpoint's ``loras`` input as the engine's request list [{"name", "weight"}].

    Accepted: empty (no LoRA); a JSON text or a list of {"name": ..., "weight": ...}, of [name, weight] pairs, or of
    names (weight 1); one such dict. A bad value is a gr.Error naming what was expected.
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise gr.Error(
                "loras must be JSON: a list of {\"name\": file, \"weight\": number} (or [file, weight] pairs), "
                f"got {text[:80]!r}.", print_exception=False) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise gr.Error(f"loras must be a list of {{\"name\", \"weight\"}}, got {type(value).__name__}.",
                       print_exception=False)
    out = []
    for item in value:
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, dict):
            name = item.get("name") or item.get("file")
            weight = item.get("weight", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, weight = item
        else:
            raise gr.Error(f"Each LoRA must be {{\"name\", \"weight\"}} or [name, weight], got {item!r}.",
                           print_exception=False)
        if not isinstance(name, str) or not name.strip():
            raise gr.Error(f"A LoRA without a file name: {item!r}.", print_exception=False)
        out.append({"name": name.strip(), "weight": _weight(weight, name)})
    return out


def _lora_key(path: str) -> str:
    return str(path).replace("\\", "/").strip("/")


def match_lora(entry: Any, names: list[str]) -> str | None:
    """The available LoRA name that a recipe entry refers to, or None.

    A recipe names the file relative to the models folder ("loras/style/x.safetensors") or to the LoRA folder
    ("style/x.safetensors"), or gives a path; a file moved to another subfolder is still found by its file name
    when that name is unique.
    """
    if isinstance(entry, dict):
        raw = entry.get("name") or entry.get("file") or entry.get("path")
    elif isinstance(entry, (list, tuple)) and entry:
        raw = entry[0]
    else:
        raw = entry
    if not raw:
        return None
    key = _lora_key(raw)
    keys = {_lora_key(n): n for n in names}
    if key in keys:
        return keys[key]
    marker = f"{LORA_FOLDER}/"
    if marker in key:
        rest = key[key.rindex(marker) + len(marker):]
        if rest in keys:
            return keys[rest]
    for k, name in keys.items():
        if key.endswith("/" + k):
            return name
    base = pathlib.PurePosixPath(key).name
    same = [name for k, name in keys.items() if pathlib.PurePosixPath(k).name == base]
    return same[0] if len(same) == 1 else None


def _entry_name(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("file") or entry.get("name") or entry.get("path") or "?")
    if isinstance(entry, (list, tuple)) and entry:
        return str(entry[0])
    return str(entry)


def _entry_weight(entry: Any) -> float:
    value = None
    if isinstance(entry, dict):
        value = entry.get("weight", entry.get("scale", entry.get("alpha")))
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        value = entry[1]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 1.0
    return min(max(value, LORA_MIN_WEIGHT), LORA_MAX_WEIGHT)


def lora_restore_plan(loras: Any, items: list[dict]) -> tuple[list[str], dict[str, float], list[str], list[str]]:
    """(names to select, name -> weight, missing files, files present but different) for a recipe's LoRAs."""
    by_name = {item["name"]: item for item in items}
    chosen: list[str] = []
    weights: dict[str, float] = {}
    missing: list[str] = []
    changed: list[str] = []
    for entry in loras or []:
        name = match_lora(entry, list(by_name))
        if name is None:
            missing.append(_entry_name(entry))
            continue
        if name in chosen:
            continue
        if len(chosen) >= MAX_LORAS:
            missing.append(f"{_entry_name(entry)} (more than {MAX_LORAS} LoRAs)")
            continue
        chosen.append(name)
        weights[name] = _entry_weight(entry)
        tag = entry.get("fingerprint") if isinstance(entry, dict) else None
        path = by_name[name].get("path")
        if tag and path:
            try:
                from engine.fingerprints import fingerprint  # noqa: PLC0415 - hashlib only, no torch

                if fingerprint(path) != tag:
                    changed.append(name)
            except OSError:
                pass
    return chosen, weights, missing, changed


@dataclasses.dataclass
class LoraPicker:
    """A multiselect of the LoRA files and one weight slider per chosen LoRA (in the order chosen)."""

    accordion: gr.Accordion
    choose: gr.Dropdown
    weights: list            # MAX_LORAS gr.Slider, the first len(chosen) shown
    refresh: gr.Button
    hint: gr.Markdown
    shown: gr.State          # the names the sliders stand for, in order
    memory: gr.State         # name -> last weight, so removing and re-adding a LoRA keeps its weight
    engine: Any = None

    @property
    def inputs(self) -> list:
        """What ``spec`` reads: [choose, shown, memory, *weights]."""
        return [self.choose, self.shown, self.memory, *self.weights]

    @property
    def outputs(self) -> list:
        """What a selection update sets: [accordion, choose, shown, memory, *weights]."""
        return [self.accordion, self.choose, self.shown, self.memory, *self.weights]

    @staticmethod
    def spec(chosen, shown, memory, *weights) -> list[dict]:
        """The request's list [{"name", "weight"}] from the controls' values."""
        current = dict(zip(shown or [], weights))
        memory = memory or {}
        return [{"name": name, "weight": _weight(current.get(name, memory.get(name, 1.0)), name)}
                for name in (chosen or [])]

    @staticmethod
    def selection_updates(chosen: list[str], weights: dict[str, float], memory: dict | None = None,
                          choices: list | None = None, set_choice: bool = True) -> list:
        """Updates for ``outputs``: select ``chosen`` with ``weights`` (1 where not given)."""
        memory = {**(memory or {}), **weights}
        sliders = []
        for i in range(MAX_LORAS):
            if i < len(chosen):
                name = chosen[i]
                sliders.append(gr.update(visible=True, label=f"{lora_short_name(name)} · weight",
                                         value=memory.get(name, 1.0)))
            else:
                sliders.append(gr.update(visible=False))
        accordion = gr.update(label=accordion_label(len(chosen)))
        if len(chosen):
            accordion = gr.update(label=accordion_label(len(chosen)), open=True)
        if not set_choice:  # the person is choosing in the dropdown: leave it alone
            choose = gr.update()
        elif choices is None:
            choose = gr.update(value=list(chosen))
        else:
            choose = gr.update(choices=choices, value=list(chosen))
        return [accordion, choose, list(chosen), memory, *sliders]


def accordion_label(count: int) -> str:
    return "LoRAs" if not count else f"LoRAs · {count} active"


def lora_hint(models_dir: Any, count: int) -> str:
    folder = pathlib.Path(str(models_dir)) / LORA_FOLDER
    where = f"`{folder}`"
    if count:
        return (f"{count} LoRA file{'s' if count != 1 else ''} in {where} (subfolders too). "
                f"Up to {MAX_LORAS} at once; weights from {LORA_MIN_WEIGHT:g} to {LORA_MAX_WEIGHT:g}.")
    return (f"No LoRA files yet. Put `.safetensors` LoRAs (kohya, diffusers/PEFT, BFL, XLabs, ai-toolkit, ...) in "
            f"{where}, then press ↻ Refresh.")


def refresh_loras_on_open(ctx: Any, picker: "LoraPicker") -> None:
    """Opening the tab re-reads the LoRA folder, so a LoRA just trained in the Train tab is in the list (the choice
    made so far is kept)."""
    if getattr(ctx, "tab", None) is None:
        return

    def on_open():
        found = list_loras(ctx.engine)
        return gr.update(choices=lora_choices(found)), lora_hint(ctx.models_dir, len(found))

    ctx.tab.select(on_open, outputs=[picker.choose, picker.hint], queue=False, api_visibility="private")


def build_lora_picker(engine: Any, models_dir: Any = None, id_prefix: str = "") -> LoraPicker:
    """The LoRA picker (an accordion); events for choosing and refreshing are wired here. ``id_prefix`` keeps element
    ids unique when several tabs have one ("edit-" gives #edit-lora-choose, ...)."""
    models_dir = models_dir or getattr(engine, "models_dir", None) or "models"
    try:
        items = list_loras(engine)
    except gr.Error:
        items = []
    with gr.Accordion(accordion_label(0), open=bool(items), elem_id=f"{id_prefix}lora-accordion") as accordion:
        with gr.Row(equal_height=False, elem_classes=["tool-row"]):
            choose = gr.Dropdown(choices=lora_choices(items), value=[], multiselect=True, max_choices=MAX_LORAS,
                                 label="LoRAs to apply", scale=5, min_width=200, elem_id=f"{id_prefix}lora-choose",
                                 interactive=True, filterable=True)
            with gr.Column(scale=1, min_width=100, elem_classes=["tool-buttons"]):
                refresh = gr.Button("↻ Refresh", size="sm", elem_id=f"{id_prefix}lora-refresh")
        weights = [gr.Slider(LORA_MIN_WEIGHT, LORA_MAX_WEIGHT, value=1.0, step=LORA_WEIGHT_STEP, label=f"LoRA {i + 1}",
                             visible=False, elem_id=f"{id_prefix}lora-weight-{i}", elem_classes=["lora-weight"])
                   for i in range(MAX_LORAS)]
        hint = gr.Markdown(lora_hint(models_dir, len(items)), elem_classes=["hint"], elem_id=f"{id_prefix}lora-hint")
    shown = gr.State([])
    memory = gr.State({})
    picker = LoraPicker(accordion=accordion, choose=choose, weights=weights, refresh=refresh, hint=hint, shown=shown,
                        memory=memory, engine=engine)

    def on_choose(chosen, shown_names, remembered, *values):
        remembered = {**(remembered or {}), **dict(zip(shown_names or [], values))}
        return LoraPicker.selection_updates(list(chosen or []), {}, remembered, set_choice=False)

    helper = {"queue": False, "api_visibility": "private"}
    # .input: only a person's choice rebinds the sliders (restore and refresh set everything themselves).
    choose.input(on_choose, inputs=picker.inputs[:3] + weights, outputs=picker.outputs, **helper)

    def on_refresh(chosen, shown_names, remembered, *values):
        found = list_loras(engine)
        names = [item["name"] for item in found]
        remembered = {**(remembered or {}), **dict(zip(shown_names or [], values))}
        kept = [name for name in (chosen or []) if name in names]
        gone = [name for name in (chosen or []) if name not in names]
        if gone:
            gr.Warning(f"No longer in the LoRA folder: {', '.join(gone)}.")
        return (*LoraPicker.selection_updates(kept, {}, remembered, lora_choices(found)),
                lora_hint(models_dir, len(found)))

    # Queued (its own slot): its warning about vanished files reaches the page only from a queued event.
    refresh.click(on_refresh, inputs=picker.inputs, outputs=[*picker.outputs, hint], show_progress="hidden",
                  api_visibility="private")
    return picker


def wire_lora_restore(button: gr.Button, source: gr.State, picker: LoraPicker) -> None:
    """Clicking ``button`` selects the recipe's LoRAs (in ``source``) with their weights; a LoRA whose file is not
    in the LoRA folder is named in a warning. A recipe without LoRAs clears the selection."""

    def restore(value, remembered):
        recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
        if not recipe:
            return [gr.update() for _ in picker.outputs] + [gr.update()]
        items = list_loras(picker.engine)
        chosen, weights, missing, changed = lora_restore_plan(recipe.get("loras"), items)
        if missing:
            gr.Warning(f"Not in the LoRA folder, so not selected: {', '.join(missing)}. "
                       f"Put the file{'s' if len(missing) > 1 else ''} in "
                       f"{pathlib.Path(str(getattr(picker.engine, 'models_dir', 'models'))) / LORA_FOLDER} "
                       "and restore again.")
        if changed:
            gr.Warning(f"A file with the same name but different contents is selected: {', '.join(changed)}; "
                       "the image may not come out the same.")
        updates = LoraPicker.selection_updates(chosen, weights, remembered, lora_choices(items))
        return [*updates, lora_hint(getattr(picker.engine, "models_dir", "models"), len(items))]

    button.click(restore, inputs=[source, picker.memory], outputs=[*picker.outputs, picker.hint],
                 show_progress="hidden", api_visibility="private")
