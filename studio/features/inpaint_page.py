"""The Inpaint & Control tab's page helpers: the output size of an image, the mask a job will use and its preview,
an extended canvas for outpainting, control-image previews and the ControlNets on offer, and a result's inputs to
put back. Files for the page go in the studio's scratch folder (``work``: a ``WorkFolder``). Pillow + numpy.
"""
from __future__ import annotations

from PIL import Image, ImageChops

from engine import registry
from engine.errors import EngineError

from .padding import work_size


def inpaint_size(image_path) -> dict:
    """The output size of an inpainting job on this image: its own ({"width", "height", "note"})."""
    from engine.images import load_user_image
    notes: list = []
    img = load_user_image(image_path, notes=notes)
    work = work_size(img.size)
    if tuple(work) != img.size:
        notes.append(f"The model works on {work[0]}x{work[1]} (multiples of 16) and the result is cropped back.")
    else:
        notes.append("The image's own size; unpainted pixels stay exactly as they are.")
    return {"width": img.width, "height": img.height, "note": " ".join(notes)}


def outpaint_canvas(image_path, mask_path, work, left=0, right=0, top=0, bottom=0) -> dict:
    """Extend the canvas: {"image": new image file, "mask_layer": RGBA layer file (white at 60 % where the model
    will paint), "note"}. A mask already painted on the image moves with it."""
    from engine.images import load_user_image
    from engine import masks
    notes: list = []
    image = load_user_image(image_path, notes=notes)
    sides = {}
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        try:
            sides[name] = max(0, int(value or 0))
        except (TypeError, ValueError):
            raise EngineError(f"{name.capitalize()} must be a whole number of pixels, got {value!r}.") from None
    if not any(sides.values()):
        raise EngineError("Give at least one side a number of pixels to extend by.")
    old = None
    if mask_path:
        old, _ = masks.mask_from_file(mask_path, image.size)
    # multiple=1: the exact sides asked for (the job pads to multiples of 16 itself and crops back)
    new_image, new_mask, note = masks.extend_canvas(image, multiple=1, **sides)
    if old is not None:
        placed = Image.new("L", new_image.size, 0)
        placed.paste(old, (sides["left"], sides["top"]))
        new_mask = ImageChops.lighter(new_mask.convert("L"), placed)      # the union of both masks
    stem = f"canvas-{new_image.width}x{new_image.height}"
    image_file, mask_file = work.save(new_image, stem), work.save(new_mask, f"{stem}.mask")
    return {"image": str(image_file), "mask": str(mask_file), "note": " ".join([*notes, note]).strip(),
            "image_key": image_key(new_image)}


def image_key(image: Image.Image) -> str:
    """A key of an image's pixels (not its file): the page's editor re-saves the same image under new names."""
    import hashlib
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()[:16]


def mask_preview(image_path, layer_path, extra_mask_path, work, invert=False, extra_key=None) -> dict:
    """The mask a job will use, made from what the page holds: the strokes painted in the editor (a layer: its
    alpha) united with a mask the page keeps beside it (an outpainting strip, a restored mask). Writes the mask
    (255 = repaint, image-sized) and a preview (the image, the area to repaint tinted) and returns {"mask" (None
    when nothing is painted), "preview", "note", "fraction"}. The editor cannot show a mask set from the server,
    so the preview is where the person sees the whole mask. ``extra_key``: the ``image_key`` of the image the kept
    mask was made for; for another image it is ignored (the person uploaded a new one)."""
    from engine.images import load_user_image
    from engine import masks
    image = load_user_image(image_path)
    notes, parts = [], []
    key = image_key(image)
    if extra_mask_path:
        with Image.open(extra_mask_path) as kept:
            if kept.size != image.size or (extra_key is not None and extra_key != key):
                extra_mask_path = None    # it belongs to an earlier image (a new one was uploaded since)
    for path in (layer_path, extra_mask_path):
        if path:
            part, note = masks.mask_from_file(path, image.size)
            parts.append(part)
            if note:
                notes.append(note)
    mask = Image.new("L", image.size, 0)
    for part in parts:
        mask = ImageChops.lighter(mask, part)
    used = masks.invert(mask) if invert else mask
    fraction = float(sum(used.histogram()[128:])) / (image.width * image.height)
    tint = Image.new("RGB", image.size, (255, 64, 160))
    preview = Image.composite(Image.blend(image.convert("RGB"), tint, 0.55), image.convert("RGB"), used)
    preview_file = work.save(preview, "mask-preview")
    mask_file = None
    if fraction > 0 or invert:
        mask_file = work.save(mask, "mask")         # as painted: the job applies mask_invert itself
    return {"mask": str(mask_file) if mask_file else None, "preview": str(preview_file),
            "note": " ".join(notes), "fraction": fraction, "image_key": key}


def preprocessors() -> list[dict]:
    """The control-image preprocessors: [{"name", "label", "mode"}] (engine.preprocess)."""
    from engine import preprocess
    return preprocess.describe()


def preview_control(image_path, preprocessor, work) -> dict:
    """A preprocessor's output for an image, as a scratch file: {"path"}."""
    from engine import preprocess
    from engine.images import load_user_image
    img = preprocess.preprocess(preprocessor or "none", load_user_image(image_path))
    return {"path": str(work.save(img, f"control-{preprocess.get(preprocessor).name}"))}


def controlnet_choices(variant_name, catalogue) -> list[dict]:
    """The ControlNets offered as control beside a variant: [{"name", "label", "kind", "available"}]."""
    variant = registry.get_variant(variant_name)
    if variant.control != "controlnet":
        return []
    out = []
    for spec in registry.CONTROLNETS:
        if spec.kind == "inpaint":
            continue
        spec = registry.get_controlnet(spec.name, demo=variant.demo)
        available = variant.demo or catalogue.file_available(spec.model_id, spec.pattern)
        out.append({"name": spec.name, "label": spec.label + ("" if available else " (download)"),
                    "kind": spec.kind, "available": available})
    return out


def inputs_to_restore(found: dict) -> dict:
    """The image inputs of a restored request (``Engine.read_recipe``) for the tab to put back: {"inpaint_image",
    "inpaint_mask" (as painted), "mask_invert", "mask_feather", "controls": [{"image", ...}], "image_key"} (what was
    found)."""
    out = {k: found[k] for k in ("inpaint_image", "inpaint_mask", "controls", "mask_invert", "mask_feather")
           if k in found}
    if out.get("inpaint_image"):
        from engine.images import load_user_image
        out["image_key"] = image_key(load_user_image(out["inpaint_image"]))
    return out
