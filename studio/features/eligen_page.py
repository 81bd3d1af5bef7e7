"""The EliGen tab's page helpers: the models on offer, a canvas, the entity masks of a painted layer and their
preview, layout files (saved and loaded), and a result's entities to put back. Files for the page go in the studio's
scratch folder (``work``: a ``WorkFolder``); the painting itself is ``studio.eligen_layout``. Pillow + numpy.
"""
from __future__ import annotations

import pathlib

from engine.sizes import normalize_size

from .. import eligen_layout
from .eligen import INPUT_COPY, studio_variants
from .padding import work_size

NOTE = ("FLUX.1-dev with the EliGen LoRA (DiffSynth-Studio/Eligen, downloaded on first use): each entity's prompt "
        "acts only in its area; the global prompt describes the whole picture.")


def info(variants: list, demo_only: bool) -> dict:
    """What the EliGen tab offers, from the catalogue's ``variants()``: {"variants": [{"name", "label", "demo"}],
    "colours", "max_entities", "note"}."""
    eligen = {v.name for v in studio_variants()}
    offered = [v for v in variants if (v["available"] or v["downloadable"]) and v["name"] in eligen]
    if any(v["available"] and not v["demo"] for v in offered):
        offered = [v for v in offered if not v["demo"]]
    offered.sort(key=lambda v: (not v["demo"]) if demo_only else v["demo"])
    return {"variants": [{"name": v["name"], "label": v["label"], "demo": v["demo"]} for v in offered],
            "colours": list(eligen_layout.COLOURS), "max_entities": eligen_layout.MAX_ENTITIES, "note": NOTE}


def canvas(work, width, height, image_path=None) -> dict:
    """A canvas: a plain one of the size asked (rounded to 16), or the input image (its own size: an inpainting job
    pads it to multiples of 16 and crops the result back): {"image" (scratch file), "width", "height", "note"}."""
    from PIL import Image
    notes = []
    if image_path:
        from engine.images import load_user_image
        img = load_user_image(image_path, notes=notes)
        work_size(img.size)                    # a size the engine can work at (else a message saying so)
        w, h, note = img.width, img.height, ""
        out = work.save(img, f"eligen-input-{w}x{h}")
    else:
        w, h, note = normalize_size(width or 1024, height or 1024)
        # A plain canvas is the same for every page of one size: one file, reused (not one per page load).
        out = work.keep(Image.new("RGB", (w, h), (236, 236, 236)), f"eligen-canvas-{w}x{h}.png")
    return {"image": str(out), "width": w, "height": h, "note": " ".join(notes + ([note] if note else []))}


def layout(work, files, canvas_path, layer_path=None, kept=None, prompts=(), labels=True) -> dict:
    """The entity masks of the page's state: the painted layer split by colour, united with the kept masks (those
    of another canvas size are resized; each checked by ``files``). Writes one mask file per entity (None where
    nothing is painted) and the preview (labelled with the prompts unless ``labels`` is False: the tab shows kept
    masks tinted on the canvas, since its editor cannot draw a layer sent to it): {"masks", "preview", "width",
    "height"}."""
    from engine.images import load_user_image
    background = load_user_image(canvas_path)
    n = max(len(prompts), 1)
    painted = eligen_layout.masks_from_layer(layer_path, background.size, n) if layer_path else [None] * n
    kept_files = list((kept or {}).get("masks") or []) if isinstance(kept, dict) else []
    files.check_all(kept_files, "a kept entity mask")
    masks, paths = [], []
    for k in range(n):
        mask = painted[k] if painted[k] is not None and painted[k].getbbox() else None
        if k < len(kept_files) and kept_files[k]:
            mask = eligen_layout.union(mask, eligen_layout.fit(kept_files[k], background.size)[0])
        masks.append(mask)
        paths.append(str(work.save(mask, f"eligen-mask{k}")) if mask is not None and mask.getbbox() else None)
    preview = work.save(eligen_layout.preview(background, masks, list(prompts), labels=labels), "eligen-preview")
    return {"masks": paths, "preview": str(preview), "width": background.width, "height": background.height}


def save_layout(outputs_dir, width, height, prompt, prompts, mask_files) -> str:
    """A layout zip (DiffSynth-Studio's EliGen folder format) under outputs/layouts/, never overwriting."""
    from engine.images import load_user_image
    from ..work_files import stamp
    masks = [load_user_image(f).convert("L") if f else None for f in mask_files]
    path = pathlib.Path(outputs_dir) / "layouts" / f"eligen-{stamp()}.zip"
    return str(eligen_layout.save_layout_zip(path, width, height, prompt, list(prompts), masks))


def load_layout(work, path) -> dict:
    """A saved layout for the page: {"width", "height", "prompt", "prompts", "masks" (files), "canvas"}."""
    data = eligen_layout.load_layout_file(path)
    plain = canvas(work, data["width"], data["height"])
    size = (plain["width"], plain["height"])
    files = [str(work.save(m.resize(size), f"eligen-loaded{k}")) for k, m in enumerate(data["masks"])]
    return {**data, "masks": files, "canvas": plain["image"], "width": plain["width"], "height": plain["height"]}


def restore(work, path, found) -> dict:
    """The entities of the image at ``path`` made in the EliGen tab (``found``: its recipe): {"prompts", "masks"
    (the copies beside it), "canvas", "width", "height", "inpaint", "input_image" (the input copy, in inpaint mode),
    "on_negative"}; {} when it has none."""
    from ..recipes import sidecar
    if not found or not found.get("eligen_entity_prompts"):
        return {}
    masks = []
    for entry in found.get("eligen_entity_masks") or []:
        copy = sidecar(path, entry.get("copy")) if isinstance(entry, dict) else None
        masks.append(str(copy) if copy is not None else None)
    source = sidecar(path, INPUT_COPY)
    back = canvas(work, found.get("width"), found.get("height"), str(source) if source else None)
    inpaint = bool(found.get("eligen_enable_inpaint")) and source is not None
    return {"prompts": list(found["eligen_entity_prompts"]), "masks": masks, "canvas": back["image"],
            "width": back["width"], "height": back["height"], "inpaint": inpaint,
            "input_image": str(source) if inpaint else None,
            "on_negative": bool(found.get("eligen_enable_on_negative"))}
