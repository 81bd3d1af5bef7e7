"""The studio's inpainting and control requests: from files and settings to the pipeline's seed arguments.

A request may carry ``inpaint_image`` + ``inpaint_mask`` (the mask: a layer whose alpha is the painted area, or a
black-and-white image; white = repaint), ``mask_invert``, ``mask_feather`` (px) and ``controls`` (a list of
{"image", "preprocessor", "controlnet", "scale", "start", "end"}; start/end are fractions of the steps, 0 = the
first). ``validate`` reads and checks all of it before any model loads; ``controlnet_specs`` says which ControlNet
files the job needs beside the variant; ``pipe_kwargs`` gives the variant's seed arguments (``flux_fill_*``,
``flex_*`` or ``controlnet_inputs``); ``finish`` crops the padding and puts the original back outside the
feathered mask, so unpainted pixels are exactly as they were.

Sizes: the output is the image's own size. The model works on the image padded (edges repeated) to multiples of
16; the padding is never part of the mask and is cropped away. A control image is fitted to that size (cropped to
its aspect, then resized) with a note. Without an inpaint image the first control image sets the size.
"""
from __future__ import annotations


from PIL import Image, ImageChops

from engine import registry
from engine.errors import EngineError
from engine.sizes import MULTIPLE, normalize_size

INPAINT_KEYS = ("inpaint_image", "inpaint_mask")
DEFAULT_FEATHER = 8
INPAINT_CONTROLNET_SCALE = 0.9      # the seed's example for the alimama Inpainting ControlNet


def validate(req: dict, variant, notes: list) -> None:
    """Read and check the inpainting/control parts of ``req`` (in place): ``req["_inpaint"]`` = {"image", "mask",
    "size", "work"} and ``req["_controls"]``; width/height set to the output size."""
    from engine.images import load_user_image
    from engine import masks
    image_path, mask_path = req.get("inpaint_image"), req.get("inpaint_mask")
    req["inpaint_image"] = str(image_path) if image_path else None
    req["inpaint_mask"] = str(mask_path) if mask_path else None
    controls = [dict(c) for c in (req.get("controls") or []) if isinstance(c, dict) and c.get("image")]
    req["controls"] = controls
    try:
        req["mask_feather"] = max(0, int(req.get("mask_feather") or 0))
    except (TypeError, ValueError):
        raise EngineError(f"Feather must be a whole number of pixels, got {req.get('mask_feather')!r}.") from None
    req["mask_invert"] = bool(req.get("mask_invert"))
    if not image_path and not controls:
        return
    if image_path:
        if not variant.inpaint:
            inpainters = [v.name for v in registry.studio_variants() if v.inpaint and not v.demo]
            raise EngineError(f"{variant.name} does not inpaint. Choose {', '.join(inpainters)}.")
        if not mask_path:
            raise EngineError("No mask: paint the area to change on the image (white), then generate.")
        image = load_user_image(image_path, notes=notes)
        given, note = masks.mask_from_file(mask_path, image.size)
        if note:
            notes.append(note)
        mask = masks.invert(given) if req["mask_invert"] else given
        masks.check_not_empty(mask)
        work = work_size(image.size)
        # given_mask: as painted (saved with the result; a restore re-applies mask_invert), mask: as used
        req["_inpaint"] = {"image": image, "mask": mask, "given_mask": given, "size": image.size, "work": work}
        req["width"], req["height"] = work
    if controls:
        if not variant.control:
            raise EngineError(f"{variant.name} takes no control images. Use FLUX.1-dev (ControlNets) or Flex.2-preview, "
                              f"or remove the control images.")
        if variant.control == "flex" and len(controls) > 1:
            raise EngineError("Flex.2 takes one control image; remove the others.")
        from engine import preprocess
        first = None
        for i, c in enumerate(controls):
            img = load_user_image(c["image"], notes=notes)
            first = first or img
            c["_original"] = img
            c["preprocessor"] = c.get("preprocessor") or "none"
            c["_processed"] = preprocess.preprocess(c["preprocessor"], img)
            c["scale"] = _fraction(c.get("scale", 1.0), "Strength", 0.0, 2.0)
            c["start"] = _fraction(c.get("start", 0.0), "From", 0.0, 1.0)
            c["end"] = _fraction(c.get("end", 1.0), "To", 0.0, 1.0)
            if c["end"] < c["start"]:
                raise EngineError(f"Control image {i + 1}: 'to' ({c['end']}) is before 'from' ({c['start']}).")
            if variant.control == "controlnet":
                spec = registry.get_controlnet(c.get("controlnet") or "Union-alpha", demo=variant.demo)
                if spec.kind == "inpaint":
                    raise EngineError("The Inpainting ControlNet is used by painting a mask, not as a control image.")
                if spec.kind == "union" and preprocess.union_mode(c["preprocessor"]) is None:
                    raise EngineError(f"Control image {i + 1}: Union-alpha needs to know what the image is: choose "
                                      f"a preprocessor (canny, tile, blur, gray, low quality) or the kind of map you "
                                      f"uploaded (depth, pose).")
                c["controlnet"] = spec.name
                c["_kind"] = spec.kind
        if "_inpaint" not in req:
            req["width"], req["height"] = work_size(first.size)
            req["_crop_to"] = first.size
        size = req["_inpaint"]["size"] if "_inpaint" in req else first.size     # the output's size
        for i, c in enumerate(controls):
            c["_fitted"], note = _fit(c["_processed"], size)
            if note:
                notes.append(f"Control image {i + 1}: {note}")
    req["_controls"] = controls


def _fraction(value, name, lo, hi) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"{name} must be a number, got {value!r}.") from None
    if not lo <= v <= hi:
        raise EngineError(f"{name} must be between {lo:g} and {hi:g}, got {v:g}.")
    return v


def work_size(size) -> tuple:
    """The size the model works at: the image's, padded up to multiples of 16 (and inside the engine's range)."""
    w, h = size
    pw, ph = -(-w // MULTIPLE) * MULTIPLE, -(-h // MULTIPLE) * MULTIPLE
    pw, ph, _ = normalize_size(pw, ph)
    return pw, ph


def _fit(image: Image.Image, size) -> tuple:
    """A control image at ``size``: cropped (centred) to its aspect when the aspects differ by over 1 %, then
    resized. (image, note)."""
    w, h = image.size
    tw, th = size
    note = ""
    if abs(w / h - tw / th) > 0.01 * (tw / th):
        if w / h > tw / th:
            nw = round(h * tw / th)
            image = image.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
        else:
            nh = round(w * th / tw)
            image = image.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
        note = f"{w}x{h} has another aspect than the output ({tw}x{th}): its centre was cropped, then resized."
    elif (w, h) != (tw, th):
        note = f"resized from {w}x{h} to {tw}x{th}."
    if image.size != (tw, th):
        image = image.resize((tw, th), Image.LANCZOS)
    return image, note


def padded(image: Image.Image, work) -> Image.Image:
    """``image`` padded right/bottom to ``work`` by repeating its edge pixels."""
    if image.size == tuple(work):
        return image
    import numpy as np
    a = np.asarray(image)
    pad = [(0, work[1] - image.height), (0, work[0] - image.width)] + [(0, 0)] * (a.ndim - 2)
    return Image.fromarray(np.pad(a, pad, mode="edge"))


def padded_mask(mask: Image.Image, work) -> Image.Image:
    """The mask padded with 0 (keep): the padding is cropped away, never repainted on purpose."""
    if mask.size == tuple(work):
        return mask
    out = Image.new("L", tuple(work), 0)
    out.paste(mask, (0, 0))
    return out


def controlnet_specs(req: dict, variant) -> list:
    """The ControlNet files the job needs beside the variant, in controlnet_id order (no repeats)."""
    names = []
    if req.get("_inpaint") and variant.inpaint == "controlnet":
        names.append("Inpainting-Beta")
    if variant.control == "controlnet":
        names += [c["controlnet"] for c in req.get("_controls") or []]
    out = []
    for name in names:
        spec = registry.get_controlnet(name, demo=variant.demo)
        if spec not in out:
            out.append(spec)
    return out


def pipe_kwargs(req: dict, variant, specs: list) -> dict:
    """The seed's pipeline arguments for this request (``specs``: the attached ControlNets, in order)."""
    from engine.controlnet import ControlNetInput
    from engine import preprocess
    out: dict = {}
    inp = req.get("_inpaint")
    ids = {spec.name: i for i, spec in enumerate(specs)}
    if inp:
        image, mask = padded(inp["image"], inp["work"]), padded_mask(inp["mask"], inp["work"])
        if variant.inpaint == "fill":
            out.update(flux_fill_image=image, flux_fill_mask=mask)
        elif variant.inpaint == "flex":
            out.update(flex_inpaint_image=image, flex_inpaint_mask=mask)
        elif variant.inpaint == "controlnet":
            out["controlnet_inputs"] = [ControlNetInput(controlnet_id=ids["Inpainting-Beta"], image=image,
                                                        inpaint_mask=mask, scale=INPAINT_CONTROLNET_SCALE)]
    work = (req["width"], req["height"])
    for c in req.get("_controls") or []:
        control = padded(c["_fitted"], work)
        if variant.control == "flex":
            # Flex.2's control acts from the first step up to ``stop`` (a fraction of the steps).
            out.update(flex_control_image=control, flex_control_strength=c["scale"],
                       flex_control_stop=c["end"])
        else:
            # The seed's start/end count down from 1 (first step) to 0 (last).
            out.setdefault("controlnet_inputs", []).append(ControlNetInput(
                controlnet_id=ids[c["controlnet"]], image=control, scale=c["scale"], start=1.0 - c["start"],
                end=1.0 - c["end"],
                processor_id=preprocess.union_mode(c["preprocessor"]) if c.get("_kind") == "union" else None))
    return out


def finish(req: dict, image: Image.Image) -> Image.Image:
    """Crop the padding; outside the feathered mask, the original pixels exactly."""
    from engine import masks
    inp = req.get("_inpaint")
    if not inp:
        size = req.get("_crop_to")            # the padding to multiples of 16, cropped away
        return image.crop((0, 0, *size)) if size and image.size != tuple(size) else image
    w, h = inp["size"]
    image = image.crop((0, 0, w, h)) if image.size != (w, h) else image
    return masks.composite(inp["image"], image, inp["mask"], req.get("mask_feather", DEFAULT_FEATHER))


# ----------------------------------------------------------------------------------------- files for the page
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

