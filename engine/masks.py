"""Inpainting masks and outpainting canvases, in PIL and numpy only (no torch: the tabs may use it).

A mask is an "L" image of the image's size: 255 = repaint, 0 = keep (white = repaint, as FLUX.1-Fill, Flex.2 and
the inpainting ControlNet read it). What a person gives is normalised by ``normalize_mask`` / ``mask_from_file``:

- a painted layer (an image with transparency, as the studio's editor returns): its alpha is the mask, whatever the
  brush colour; an opaque image: its brightness;
- another size than the image's: resized to it, and a note says so;
- thresholded at 128 to exactly 0 / 255.

``composite`` puts the generated pixels back into the original through the (optionally feathered) mask; pixels
outside the mask stay exactly as they were. ``feather_mask`` therefore softens the edge inwards only: the soft band lies
inside the painted area (a stroke thinner than the feather is softened throughout).

``extend_canvas`` prepares outpainting: the image on a larger canvas (new area filled by stretching the edge pixels or
with a neutral colour) and a mask of the new area plus a small overlap into the original, so the seam is repainted.
The canvas is rounded up to multiples of 16 (one image token), the extra going to the extended sides, with a note.
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import EngineError
from .images import load_pixels, open_checked
from .sizes import MAX_SIZE, MULTIPLE

THRESHOLD = 128
DEFAULT_OVERLAP = 8          # px of the original the outpainting mask also covers, so the seam is repainted
NEUTRAL = (128, 128, 128)
FILLS = ("edge", "color")
EMPTY_MESSAGE = "The mask is empty: paint the area to change."


# ------------------------------------------------------------------------------------------------ reading
def to_mask(image: Image.Image) -> Image.Image:
    """The "L" image a user mask means, before thresholding: the alpha of a layer with transparency (the painting),
    otherwise the brightness."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return image.convert("L")


def threshold(mask: Image.Image, level: int = THRESHOLD) -> Image.Image:
    """0 / 255 "L": 255 where the value is at least ``level``."""
    values = np.asarray(mask.convert("L"))
    return Image.fromarray(np.where(values >= level, 255, 0).astype(np.uint8), "L")


def normalize_mask(mask: Image.Image, size) -> tuple[Image.Image, str]:
    """A user mask as the image of ``size`` (width, height) needs it: (0/255 "L" mask, note; '' when nothing changed
    but the format)."""
    size = (int(size[0]), int(size[1]))
    if not isinstance(mask, Image.Image):
        raise EngineError(f"The mask is a {type(mask).__name__}, not an image.")
    mask = to_mask(mask)
    note = ""
    if mask.size != size:
        w, h = mask.size
        note = f"The mask ({w}x{h}) was resized to the image's size ({size[0]}x{size[1]})"
        if abs(w / h - size[0] / size[1]) > 0.01 * size[0] / size[1]:
            note += "; its shape differs from the image's, so it was stretched"
        note += "."
        # Thresholded first, so a half-transparent brush counts fully; bilinear then 128 puts each edge where the
        # painted cells' edges scale to.
        mask = threshold(mask).resize(size, Image.BILINEAR)
    return threshold(mask), note


def mask_from_file(source, size) -> tuple[Image.Image, str]:
    """``normalize_mask`` of a mask file (path or file object) or PIL image."""
    if isinstance(source, Image.Image):
        return normalize_mask(source, size)
    name = f"The mask {pathlib.Path(str(getattr(source, 'name', source))).name}"
    try:
        with open_checked(source, name) as img:    # the header's size checked before any pixel is decoded
            mask = ImageOps.exif_transpose(load_pixels(img, name))
    except (OSError, ValueError) as exc:
        raise EngineError(f"Cannot read the mask {getattr(source, 'name', source)}: {exc}. "
                          f"Save it as PNG and try again.") from None
    return normalize_mask(mask, size)


def is_empty(mask: Image.Image) -> bool:
    return threshold(mask).getextrema()[1] == 0


def check_not_empty(mask: Image.Image) -> None:
    """Refuse a mask that marks nothing (nothing would change)."""
    if is_empty(mask):
        raise EngineError(EMPTY_MESSAGE)


def invert(mask: Image.Image) -> Image.Image:
    """Repaint what was kept and keep what was painted."""
    return ImageOps.invert(threshold(mask))


# ------------------------------------------------------------------------------------------------ compositing
def feather_mask(mask: Image.Image, radius: float) -> Image.Image:
    """The blending alpha ("L") of ``mask`` with a soft edge about ``radius`` px wide, lying inside the mask:
    exactly 0 outside it, 255 further than ``radius`` inside a straight edge."""
    binary = threshold(mask)
    if not radius or radius <= 0:
        return binary
    # A Gaussian of sigma radius/2 is 0.5 on a straight edge; 2 * blur - 1 rises from 0 there to 0.95 at radius px.
    blurred = np.asarray(binary.filter(ImageFilter.GaussianBlur(radius / 2.0)), dtype=np.float32) / 255.0
    alpha = np.clip(2.0 * blurred - 1.0, 0.0, 1.0) * (np.asarray(binary) > 0)
    return Image.fromarray(np.round(alpha * 255.0).astype(np.uint8), "L")


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image, feather: float = 0) -> Image.Image:
    """``generated`` inside ``mask`` (its edge feathered ``feather`` px inwards), ``original`` outside it, exactly."""
    original, generated = original.convert("RGB"), generated.convert("RGB")
    if generated.size != original.size:
        raise ValueError(f"generated image {generated.size} and original {original.size} differ in size")
    alpha_img, _ = normalize_mask(mask, original.size)
    alpha = np.asarray(feather_mask(alpha_img, feather), dtype=np.uint32)[..., None]
    a, b = np.asarray(original, dtype=np.uint32), np.asarray(generated, dtype=np.uint32)
    # Integer blend, rounded: alpha 0 gives the original exactly, 255 the generated pixel exactly.
    out = (a * (255 - alpha) + b * alpha + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------ outpainting
def plan_extension(size, left=0, right=0, top=0, bottom=0, multiple: int = MULTIPLE) -> dict:
    """How far each side grows so the canvas is a multiple of ``multiple``: {"left", "right", "top", "bottom",
    "size": (width, height), "note"}. The rounding goes to the extended side (right / bottom first); an axis not
    extended grows at the right / bottom."""
    sides = {}
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        try:
            sides[name] = int(value or 0)
        except (TypeError, ValueError):
            raise EngineError(f"{name.capitalize()} must be a whole number of pixels, got {value!r}.") from None
        if sides[name] < 0:
            raise EngineError(f"{name.capitalize()} must be 0 or more pixels, got {sides[name]}.")
    asked = dict(sides)
    w, h = int(size[0]), int(size[1])
    for first, second, length in (("left", "right", w), ("top", "bottom", h)):
        total = length + sides[first] + sides[second]
        extra = -total % multiple
        if extra:
            grow = second if sides[second] or not sides[first] else first
            sides[grow] += extra
    new = (w + sides["left"] + sides["right"], h + sides["top"] + sides["bottom"])
    if max(new) > MAX_SIZE:
        raise EngineError(f"The extended canvas would be {new[0]}x{new[1]}; a side may be at most {MAX_SIZE} "
                          f"pixels. Extend by less.")
    note = ""
    changed = [f"{n} by {sides[n]} px ({asked[n]} asked)" for n in sides if sides[n] != asked[n]]
    if changed:
        note = (f"The canvas is {new[0]}x{new[1]}, rounded up to a multiple of {multiple}: "
                f"{', '.join(changed)}.")
    return {**sides, "size": new, "note": note}


def extend_canvas(image: Image.Image, left=0, right=0, top=0, bottom=0, fill: str = "edge",
                  color=NEUTRAL, overlap: int = DEFAULT_OVERLAP,
                  multiple: int = MULTIPLE) -> tuple[Image.Image, Image.Image, str]:
    """Outpainting input: (the image on the larger canvas, its mask, note).

    ``fill``: "edge" stretches the border pixels outwards, "color" paints the new area ``color``. The mask is 255
    on the new area and ``overlap`` px into the original along every side that grew."""
    if fill not in FILLS:
        raise EngineError(f"Unknown canvas fill {fill!r}; choose one of {', '.join(FILLS)}.")
    plan = plan_extension(image.size, left, right, top, bottom, multiple)
    l, r, t, b = plan["left"], plan["right"], plan["top"], plan["bottom"]
    if not any((l, r, t, b)):
        raise EngineError("Give at least one side a number of pixels to extend by.")
    src = np.asarray(image.convert("RGB"))
    h, w = src.shape[:2]
    if fill == "edge":
        canvas = np.pad(src, ((t, b), (l, r), (0, 0)), mode="edge")
    else:
        canvas = np.empty((h + t + b, w + l + r, 3), dtype=np.uint8)
        canvas[:] = np.asarray(_rgb(color), dtype=np.uint8)
        canvas[t:t + h, l:l + w] = src
    overlap = max(0, int(overlap or 0))
    keep_top, keep_left = t + (min(overlap, h) if t else 0), l + (min(overlap, w) if l else 0)
    keep_bottom, keep_right = t + h - (min(overlap, h) if b else 0), l + w - (min(overlap, w) if r else 0)
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    if keep_bottom > keep_top and keep_right > keep_left:
        mask[keep_top:keep_bottom, keep_left:keep_right] = 0
    return Image.fromarray(canvas, "RGB"), Image.fromarray(mask, "L"), plan["note"]


def _rgb(color) -> tuple:
    if isinstance(color, str):
        from PIL import ImageColor
        try:
            return ImageColor.getrgb(color)[:3]
        except ValueError:
            raise EngineError(f"Unknown colour {color!r}; use a name such as 'gray' or a code such as '#808080'.") \
                from None
    values = tuple(int(c) for c in color)
    if len(values) != 3 or not all(0 <= c <= 255 for c in values):
        raise EngineError(f"A colour is three values 0..255, got {color!r}.")
    return values

