"""Reading the images people hand in (reference images for editing) and choosing an edit's output size.

Pillow only (no torch): the studio's tabs may use it for a live size line. Every refusal is an ``EngineError``
whose message names the file, what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import io
import math
import pathlib
import struct
from typing import Any, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EngineError
from .sizes import MAX_SIZE, MIN_SIZE, MULTIPLE

MIN_SIDE = 64                   # smaller than this on a side: refused (a few latent pixels carry nothing)
MAX_PIXELS = 40_000_000         # above this (or MAX_SIDE on a side): refused before decoding
MAX_SIDE = 8192                 # a side longer than this: refused (4097..8192 is downscaled)
DOWNSCALE_SIDE = 4096           # a longer side than this is downscaled to it, with a note
DEFAULT_PIXELS = 1024 * 1024
# What an upload or a mask may be: formats Pillow decodes itself (EPS, PDF and the exotic decoders are attack surface
# nobody needs here). The message names the three everyone has.
HEADER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
BOMB_PIXELS = 89_478_485        # Pillow's default decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
# Pillow's own bomb refusals (the warning too: a warnings filter may raise it), caught wherever an image is read.
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def _name(source: Any) -> str:
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "the image"
    return pathlib.Path(str(source)).name or str(source)


@contextlib.contextmanager
def _binary(source: Any, name: str):
    """A binary file object for a path, bytes or an open file (rewound; an open file is left open)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    elif hasattr(source, "read"):
        source.seek(0)
        yield source
        source.seek(0)
    else:
        try:
            fp = open(str(source), "rb")
        except OSError:
            raise EngineError(f"{name} was not found; upload it again.") from None
        with fp:
            yield fp


def _identify(fp, name: str):
    """The header of an image of HEADER_FORMATS, parsed without decoding and without Pillow's own bomb check (which
    refuses before saying the size); None when no format accepts it."""
    prefix = fp.read(16)
    if not prefix:
        raise EngineError(f"{name} is an empty file; upload the image again.")
    Image.init()
    for fmt in HEADER_FORMATS:
        factory, accept = Image.OPEN[fmt]
        found = accept(prefix) if accept else True
        if isinstance(found, str) or not found:     # a str: Pillow's note that the format's codec is missing
            continue
        fp.seek(0)
        try:
            return factory(fp, name)
        except BOMB_ERRORS:              # a GIF frame larger than its screen, found while reading the header
            raise EngineError(f"{name} is a decompression bomb (a frame far larger than the image); refused "
                              f"without decoding it. Use a PNG, JPEG or WebP file.") from None
        except (SyntaxError, OSError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error):
            continue
    return None


def read_header(source: Any, name: Optional[str] = None) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) of an image (path, bytes or file object) from its header, nothing decoded; an
    EngineError naming it for an empty file or one that is not a PNG, JPEG, WebP, GIF, BMP or TIFF image."""
    name = name or _name(source)
    with _binary(source, name) as fp:
        img = _identify(fp, name)
        if img is None:
            raise EngineError(f"{name} is not an image (use PNG, JPEG or WebP).")
        return img.format, img.size


def size_problem(name: str, size: tuple[int, int], file_bytes: Optional[int] = None,
                 max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> str:
    """Why an image of ``size`` is refused before decoding ('' when it is not): over the limits, and by name when it
    is a decompression bomb (more pixels than Pillow itself would open quietly)."""
    w, h = size
    if w * h <= max_pixels and max(w, h) <= max_side:
        return ""
    text = (f"{name}: {w}×{h} is too large: at most {max_pixels / 1e6:.3g} MP / {max_side} px a side; "
            f"resize it first.")
    if w * h > BOMB_PIXELS:
        made = f" from a {file_bytes / 1024:.0f} KB file" if file_bytes is not None else ""
        text += (f" (It would decode to {w * h / 1e6:,.0f} MP{made}: a decompression bomb, refused without "
                 f"decoding it.)")
    return text


def check_image_file(source: Any, name: Optional[str] = None, max_pixels: int = MAX_PIXELS,
                     max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The (width, height) of an image file whose header shows it may be decoded: an image of a known format, at
    most ``max_pixels`` and ``max_side`` px a side; an EngineError naming the file and the problem otherwise."""
    name = name or _name(source)
    _, size = read_header(source, name)
    problem = size_problem(name, size, _byte_count(source), max_pixels, max_side)
    if problem:
        raise EngineError(problem)
    return size


def _byte_count(source: Any) -> Optional[int]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    try:
        return pathlib.Path(str(source)).stat().st_size if not hasattr(source, "read") else None
    except (OSError, ValueError):
        return None


def open_checked(source: Any, name: Optional[str] = None, max_pixels: int = MAX_PIXELS,
                 max_side: int = MAX_SIDE) -> Image.Image:
    """``Image.open`` of a file (path or file object) after ``check_image_file``: nothing is decoded before the size
    is known to be safe, and Pillow's own bomb refusals (never reached then) still arrive as an EngineError."""
    name = name or _name(source)
    check_image_file(source, name, max_pixels, max_side)
    try:
        return Image.open(source if hasattr(source, "read") else str(source), formats=HEADER_FORMATS)
    except BOMB_ERRORS:
        raise EngineError(f"{name} is too large to open safely (a decompression bomb); resize it first.") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise EngineError(f"{name} is not an image (use PNG, JPEG or WebP).") from None


def load_pixels(img: Image.Image, name: str) -> Image.Image:
    """Decode an image from ``open_checked``; a damaged file, or one whose frames outgrow its header (a bomb Pillow
    finds while decoding), is an EngineError naming it."""
    try:
        img.load()
    except BOMB_ERRORS:
        raise EngineError(f"{name} grows far beyond its stated size while decoding (a decompression bomb); "
                          f"refused. Save it again as PNG.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise EngineError(f"{name} is damaged or truncated and could not be read ({exc}); "
                          "save it again or use another file.") from None
    return img


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
        _check_edit_size(name, read_header(path, name)[1])     # from the header, before anything is decoded
        img = open_checked(path, name)
    w, h = img.size
    _check_edit_size(name, (w, h))
    if min(w, h) < MIN_SIDE:
        raise EngineError(f"{name} is only {w}x{h} px; an image to edit needs at least {MIN_SIDE} px on each side. "
                          "Use a larger image (or upscale it first).")
    load_pixels(img, name)
    try:
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


def _check_edit_size(name: str, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        bomb = " It would be a decompression bomb: refused without decoding it." if w * h > BOMB_PIXELS else ""
        raise EngineError(f"{name} is {w}x{h} ({w * h / 1e6:.1f} MP), too large to edit: the limit is "
                          f"{MAX_PIXELS // 1_000_000} MP and {MAX_SIDE} px on a side. Resize it (to about "
                          f"{DOWNSCALE_SIDE} px on the long side) and try again.{bomb}")


def image_size(source: Any) -> tuple[int, int]:
    """The upright size (EXIF rotation applied) of an image file, read from its header only."""
    if isinstance(source, Image.Image):
        img = source
    else:
        read_header(source)          # a refusal naming the file before Pillow's own checks
        try:
            img = Image.open(str(source), formats=HEADER_FORMATS)
        except (UnidentifiedImageError, OSError, ValueError, *BOMB_ERRORS) as exc:
            raise EngineError(f"{_name(source)} is not an image Pillow can read safely ({type(exc).__name__}); "
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
