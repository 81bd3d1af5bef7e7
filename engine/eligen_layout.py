"""EliGen layouts as the studio handles them: one colour per entity painted on one layer, entity masks kept beside
it, a preview, and a layout file (prompts + masks) to save and load. Pure PIL/numpy, no torch.

A painted layer holds every entity: each painted pixel belongs to the entity whose colour is nearest (the browser
may blend the brush's edge). Masks are "L" images, 255 = the entity is there, at the canvas size; a mask of
another size is resized (nearest) with a note. A layout file is a zip of DiffSynth-Studio's EliGen folder format
(``engine.eligen.layout``), so layouts travel between the two.
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, ImageDraw

from .errors import EngineError

# Distinct, saturated colours (the brush's palette; entity k is painted in COLOURS[k]).
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
MAX_ENTITIES = len(COLOURS)


def _rgb(colour: str) -> tuple:
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


def masks_from_layer(layer_path, size, count: int = MAX_ENTITIES) -> list:
    """The first ``count`` entities' masks from a painted layer (RGBA: alpha > 0 = painted, colour = entity)."""
    with Image.open(layer_path) as layer:
        layer = layer.convert("RGBA")
    if layer.size != tuple(size):
        layer = layer.resize(tuple(size), Image.NEAREST)
    a = np.asarray(layer).astype(np.int32)
    painted = a[..., 3] > 0
    palette = np.array([_rgb(c) for c in COLOURS[:count]], dtype=np.int32)
    dist = ((a[..., None, :3] - palette[None, None]) ** 2).sum(-1)
    owner = dist.argmin(-1)
    return [Image.fromarray(((owner == k) & painted).astype(np.uint8) * 255, "L") for k in range(count)]


def fit(mask_path_or_image, size) -> tuple:
    """A mask at ``size`` (L, 0/255) and a note when it had to be resized."""
    img = mask_path_or_image if isinstance(mask_path_or_image, Image.Image) else Image.open(mask_path_or_image)
    if img.mode in ("RGBA", "LA") and img.getchannel("A").getextrema()[0] < 255:
        img = img.getchannel("A")
    img = img.convert("L")
    note = ""
    if img.size != tuple(size):
        note = f"An entity mask of {img.width}x{img.height} was resized to {size[0]}x{size[1]}."
        img = img.resize(tuple(size), Image.NEAREST)
    return img.point(lambda v: 255 if v >= 128 else 0), note


def union(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return Image.fromarray(np.maximum(np.asarray(a), np.asarray(b)), "L")


def preview(background: Image.Image, masks: list, prompts: list, labels: bool = True) -> Image.Image:
    """The canvas with each entity's area tinted in its colour and (``labels``) labelled with its prompt."""
    base = background.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for k, mask in enumerate(masks):
        if mask is None or not mask.getbbox():
            continue
        colour = Image.new("RGBA", base.size, _rgb(COLOURS[k % MAX_ENTITIES]) + (110,))
        overlay = Image.alpha_composite(overlay, Image.composite(colour, Image.new("RGBA", base.size), mask))
        draw = ImageDraw.Draw(overlay)
        if not labels:
            continue
        box = mask.getbbox()
        label = f"{k + 1}: {prompts[k] if k < len(prompts) and prompts[k] else '(no prompt)'}"
        draw.text((box[0] + 4, box[1] + 3), label[:40], fill=(255, 255, 255, 255), stroke_width=2,
                  stroke_fill=(0, 0, 0, 255))
    return Image.alpha_composite(base, overlay).convert("RGB")


def save_layout_zip(path, width: int, height: int, prompt: str, prompts: list, masks: list, **extra) -> pathlib.Path:
    """A layout as one file: a zip of DiffSynth-Studio's EliGen folder format (0.png, 1.png, ... and prompts.json;
    ``engine.eligen.layout``), written to a temporary name and renamed."""
    import tempfile
    import zipfile
    from .eligen.layout import save_layout
    kept = [(p, m) for p, m in zip(prompts, masks) if m is not None and m.getbbox()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_layout(pathlib.Path(tmp) / "layout", prompt, [p for p, _ in kept], [m for _, m in kept],
                             width=int(width), height=int(height), **extra)
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                z.write(f, f.name)
        part.replace(path)
    return path


def load_layout_file(path) -> dict:
    """{"width", "height", "prompt", "prompts", "masks" (L, fitted to the layout's size)} from a layout zip (or a
    DiffSynth EliGen folder)."""
    import tempfile
    import zipfile
    from .eligen.layout import load_layout
    path = pathlib.Path(path)
    if path.is_dir():
        data = load_layout(path)
    else:
        if not zipfile.is_zipfile(path):
            raise EngineError(f"{path.name} is not an EliGen layout (a .zip saved from the EliGen tab, holding "
                              f"0.png, 1.png, ... and prompts.json).")
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if "/" not in n.strip("/") and not n.startswith((".", "/"))]
            for n in names:
                z.extract(n, tmp)
            data = load_layout(tmp)
    masks = data["entity_masks"]
    size = (int(data.get("width") or masks[0].width), int(data.get("height") or masks[0].height)) if masks else \
        (int(data.get("width") or 1024), int(data.get("height") or 1024))
    return {"width": size[0], "height": size[1], "prompt": data.get("prompt", ""),
            "prompts": list(data["entity_prompts"])[:MAX_ENTITIES],
            "masks": [fit(m, size)[0] for m in masks][:MAX_ENTITIES]}
