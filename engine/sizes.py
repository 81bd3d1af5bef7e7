"""The one size rule used everywhere: multiples of 16 (one image token), rounded up as the seed does."""
from __future__ import annotations

from .errors import EngineError

MULTIPLE = 16
MIN_SIZE, MAX_SIZE = 64, 4096


def normalize_size(width: int, height: int) -> tuple[int, int, str]:
    """Returns ``(width, height, note)``; the note says what was rounded ('' when nothing was)."""
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        raise EngineError(f"Width and height must be whole numbers, got {width!r} x {height!r}.") from None
    for name, v in (("width", w), ("height", h)):
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise EngineError(f"The {name} {v} is outside {MIN_SIZE}..{MAX_SIZE} pixels; choose a size in that range.")
    rw, rh = -(-w // MULTIPLE) * MULTIPLE, -(-h // MULTIPLE) * MULTIPLE
    note = "" if (rw, rh) == (w, h) else f"{w}x{h} rounded up to {rw}x{rh} (a multiple of {MULTIPLE})"
    return rw, rh, note
