"""Reading the images people hand in (reference images for editing) and choosing an edit's output size.

Pillow only (no torch): the studio's tabs may use it for a live size line. Every refusal is an ``EngineError``
whose message names the file, what is wrong and what to do.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EngineError
from .sizes import MAX_SIZE, MIN_SIZE, MULTIPLE

MIN_SIDE = 64                   # smaller than this on a side: refused (a few latent pixels carry nothing)
MAX_PIXELS = 40_000_000         # above this (or MAX_SIDE on a side): refused before decoding
MAX_SIDE = 8192                 # a side longer than this: refused (4097..8192 is downscaled)
DOWNSCALE_SIDE = 4096           # a longer side than this is downscaled to it, with a note
DEFAULT_PIXELS = 1024 * 1024


def _name(source: Any) -> str:
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "the image"
    return pathlib.Path(str(source)).name or str(source)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: transparency composited over white, 16/32-bit scaled down, CMYK converted."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (PNG) or 32-bit integer grey: scale the real range of the format to 0..255.
        import numpy as np  # Pillow's own dependency for array access; no torch

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8")
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # RGB, L, CMYK, YCbCr, LAB, HSV


def load_user_image(source: Any, notes: Optional[list] = None) -> Image.Image:
    """An image file (path) or a PIL image as an upright 8-bit RGB image.

    EXIF rotation is applied; RGBA/LA/transparent palettes are put on white; palette, 16-bit, CMYK and the other
    modes are converted. Images under 64 px on a side, over 40 MP or over 8192 px on a side are refused; a side
    over 4096 px is downscaled to 4096 (aspect kept) and ``notes`` (when given) says so. A file that is not an
    image, or is damaged, is refused naming the file.
    """
    name = _name(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        path = pathlib.Path(str(source))
        if not path.is_file():
            raise EngineError(f"The image {name} was not found ({path}); upload it again.")
        try:
            img = Image.open(path)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise EngineError(f"{name} is not an image Pillow can read ({type(exc).__name__}); "
                              "use a PNG, JPEG or WebP file.") from None
        except Image.DecompressionBombError:
            raise EngineError(f"{name} is far too large to open safely; resize it below "
                              f"{MAX_PIXELS // 1_000_000} MP first.") from None
    w, h = img.size
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        raise EngineError(f"{name} is {w}x{h} ({w * h / 1e6:.1f} MP), too large to edit: the limit is "
                          f"{MAX_PIXELS // 1_000_000} MP and {MAX_SIDE} px on a side. Resize it (to about "
                          f"{DOWNSCALE_SIDE} px on the long side) and try again.")
    if min(w, h) < MIN_SIDE:
        raise EngineError(f"{name} is only {w}x{h} px; an image to edit needs at least {MIN_SIDE} px on each side. "
                          "Use a larger image (or upscale it first).")
    try:
        img.load()
        upright = ImageOps.exif_transpose(img)
        rgb = _to_rgb(upright if upright is not None else img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise EngineError(f"{name} is damaged or truncated and could not be read ({exc}); "
                          "save it again or use another file.") from None
    long_side = max(rgb.size)
    if long_side > DOWNSCALE_SIDE:
        scale = DOWNSCALE_SIDE / long_side
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        if notes is not None:
            notes.append(f"{name} ({rgb.width}x{rgb.height}) was downscaled to {size[0]}x{size[1]} "
                         f"(at most {DOWNSCALE_SIDE} px on a side).")
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return rgb


def image_size(source: Any) -> tuple[int, int]:
    """The upright size (EXIF rotation applied) of an image file, read from its header only."""
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(str(source))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise EngineError(f"{_name(source)} is not an image Pillow can read ({type(exc).__name__}); "
                              "use a PNG, JPEG or WebP file.") from None
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the stored size
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _round16(value: float) -> int:
    return max(MULTIPLE, int(round(value / MULTIPLE)) * MULTIPLE)


def edit_output_size(image_size: tuple[int, int], target_pixels: Optional[float] = DEFAULT_PIXELS,
                     width: Optional[int] = None, height: Optional[int] = None) -> tuple[int, int, str]:
    """The output size of an edit: ``(width, height, note)``.

    By default the input's aspect ratio at about ``target_pixels`` pixels, each side a multiple of 16. An explicit
    ``width`` and ``height`` are used as asked (rounded up to 16); only one of them: the other follows the aspect.
    The input is never cropped: the whole reference image is given to the model, and the note says so.
    """
    iw, ih = (int(v) for v in image_size)
    if iw <= 0 or ih <= 0:
        raise EngineError(f"The input image has no size ({iw}x{ih}).")
    aspect = iw / ih
    width = int(width) if width else None
    height = int(height) if height else None
    if width and height:
        w, h, how = width, height, "as asked"
    elif width:
        w, h, how = width, width / aspect, "width as asked, height following the input's aspect"
    elif height:
        w, h, how = height * aspect, height, "height as asked, width following the input's aspect"
    else:
        pixels = float(target_pixels or DEFAULT_PIXELS)
        if pixels <= 0:
            raise EngineError(f"The pixel count must be positive, got {target_pixels}.")
        w, h = math.sqrt(pixels * aspect), math.sqrt(pixels / aspect)
        how = f"the input's aspect ({iw}x{ih}) at about {pixels / 2 ** 20:.2f} MP (1 MP = 1024x1024)"
    if width and height:
        rw, rh = -(-width // MULTIPLE) * MULTIPLE, -(-height // MULTIPLE) * MULTIPLE
    else:
        rw, rh = _round16(w), _round16(h)
    # Keep inside the engine's size range, preserving the aspect as far as the limits allow.
    scale = min(1.0, MAX_SIZE / max(rw, rh))
    if scale < 1.0:
        rw, rh = _round16(rw * scale), _round16(rh * scale)
        how += f", scaled down to fit {MAX_SIZE} px"
    if min(rw, rh) < MIN_SIZE:
        scale = MIN_SIZE / min(rw, rh)
        rw, rh = min(MAX_SIZE, _round16(rw * scale)), min(MAX_SIZE, _round16(rh * scale))
        how += f", scaled up to at least {MIN_SIZE} px"
    note = f"{rw}x{rh}: {how}, multiples of {MULTIPLE}; the input is not cropped."
    if width and height and abs(rw / rh - aspect) > 0.02 * aspect:
        note += f" The aspect differs from the input's ({iw}x{ih}): the model sees the whole input and may stretch it."
    return rw, rh, note
