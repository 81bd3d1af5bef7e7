"""EliGen layouts as the studio handles them: one colour per entity painted on one layer, entity masks kept beside
it, a preview, and a layout file (prompts + masks) to save and load. Pure PIL/numpy, no torch.

A painted layer holds every entity: each painted pixel belongs to the entity whose colour is nearest (the browser
may blend the brush's edge). Masks are "L" images, 255 = the entity is there, at the canvas size; a mask of
another size is resized (nearest) with a note. A layout file is a zip of DiffSynth-Studio's EliGen folder format
(``engine.eligen.layout``), so layouts travel between the two.
"""
from __future__ import annotations

import pathlib
import shutil

import numpy as np
from PIL import Image, ImageDraw

from engine import safe_files
from engine.errors import EngineError
from engine.images import load_pixels, open_checked

# Distinct, saturated colours (the brush's palette; entity k is painted in COLOURS[k]).
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
MAX_ENTITIES = len(COLOURS)
# A layout zip, checked from its directory before anything is read: a layout is a few small PNGs and a JSON file.
MAX_LAYOUT_FILE = 64 << 20        # bytes on disk
MAX_LAYOUT_MEMBERS = 80
MAX_MEMBER_BYTES = 32 << 20       # uncompressed, per member (a 4096x4096 noise mask fits)
MAX_LAYOUT_BYTES = 96 << 20       # uncompressed, all members together


def _rgb(colour: str) -> tuple:
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


def masks_from_layer(layer_path, size, count: int = MAX_ENTITIES) -> list:
    """The first ``count`` entities' masks from a painted layer (RGBA: alpha > 0 = painted, colour = entity)."""
    with open_checked(layer_path, "The painted layer") as layer:    # size checked before decoding
        layer = load_pixels(layer, "The painted layer").convert("RGBA")
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
    img = mask_path_or_image
    if not isinstance(img, Image.Image):           # a file: its size checked from the header before decoding
        name = f"The entity mask {pathlib.Path(str(img)).name}"
        img = load_pixels(open_checked(img, name), name)
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
    ``engine.eligen.layout``), written whole under a temporary name and linked to ``path`` (never over a file)."""
    import io
    import tempfile
    import zipfile
    from engine.eligen.layout import save_layout
    kept = [(p, m) for p, m in zip(prompts, masks) if m is not None and m.getbbox()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_layout(pathlib.Path(tmp) / "layout", prompt, [p for p, _ in kept], [m for _, m in kept],
                             width=int(width), height=int(height), **extra)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                z.write(f, f.name)
    return safe_files.write_bytes(path, buffer.getvalue(), exclusive=True)


def _layout_members(z, name: str) -> list:
    """The members of a layout zip to extract: top-level files only (a path with folders, "..", or a leading "/" or
    "." is never extracted: no zip-slip), their count and uncompressed sizes checked before any is read."""
    infos = z.infolist()
    if len(infos) > MAX_LAYOUT_MEMBERS:
        raise EngineError(f"{name} holds {len(infos)} files; an EliGen layout holds prompts.json and one PNG per "
                          f"entity. Save the layout again from the EliGen tab.")
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > MAX_MEMBER_BYTES or total > MAX_LAYOUT_BYTES:
            raise EngineError(f"{name}: {info.filename[:80]!r} unpacks to {info.file_size / 2 ** 20:,.0f} MB "
                              f"(at most {MAX_MEMBER_BYTES >> 20} MB a file, {MAX_LAYOUT_BYTES >> 20} MB in all); "
                              f"it is no EliGen layout. Save the layout again from the EliGen tab.")
    return [i for i in infos if i.filename and not i.is_dir() and "/" not in i.filename and "\\" not in i.filename
            and not i.filename.startswith(".") and "\x00" not in i.filename]


def load_layout_file(path) -> dict:
    """{"width", "height", "prompt", "prompts", "masks" (L, fitted to the layout's size)} from a layout zip (or a
    DiffSynth EliGen folder): its first MAX_ENTITIES entities. Sizes are checked before anything is allocated."""
    import tempfile
    import zipfile
    import zlib
    path = pathlib.Path(path)
    if path.is_dir():
        return _read_layout(path)
    if not path.is_file() or path.stat().st_size > MAX_LAYOUT_FILE or not zipfile.is_zipfile(path):
        raise EngineError(f"{path.name} is not an EliGen layout (a .zip saved from the EliGen tab, holding "
                          f"0.png, 1.png, ... and prompts.json).")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with zipfile.ZipFile(path) as z:
                for info in _layout_members(z, path.name):
                    # zipfile never yields more than a member's stated size, which _layout_members bounded.
                    with z.open(info) as src, open(pathlib.Path(tmp) / info.filename, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError, OSError) as exc:
            raise EngineError(f"{path.name} is a damaged or encrypted zip ({exc}); save the layout again from "
                              f"the EliGen tab.") from None
        return _read_layout(tmp)


def _read_layout(folder) -> dict:
    """One mask at a time, each fitted (to "L") as soon as it is read, so at most one full-mode mask is held."""
    from engine.eligen.layout import read_mask, read_prompts
    data = read_prompts(folder)
    prompts = ["" if p is None else str(p) for p in data.get("mask_prompts") or []][:MAX_ENTITIES]
    size = (int(data.get("width") or 1024), int(data.get("height") or 1024))
    masks = []
    for i, prompt in enumerate(prompts):
        mask = read_mask(folder, i, prompt)
        if i == 0:          # without a size in prompts.json, the first mask's
            size = (int(data.get("width") or mask.width), int(data.get("height") or mask.height))
        masks.append(fit(mask, size)[0])
    return {"width": size[0], "height": size[1], "prompt": str(data.get("global_prompt") or ""), "prompts": prompts,
            "masks": masks}
