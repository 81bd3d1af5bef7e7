"""Inputs of any size: the model works on multiples of 16, so an input image keeps its own size as the output's and is
padded for the model (edges repeated; a mask with 0, so the padding is never repainted on purpose), and the result is
cropped back. Used by inpainting, control images and EliGen's inpaint mode. Pillow + numpy.
"""
from __future__ import annotations

from PIL import Image

from engine.sizes import MULTIPLE, normalize_size


def work_size(size) -> tuple:
    """The size the model works at: the image's, padded up to multiples of 16 (and inside the engine's range)."""
    w, h = size
    pw, ph = -(-w // MULTIPLE) * MULTIPLE, -(-h // MULTIPLE) * MULTIPLE
    pw, ph, _ = normalize_size(pw, ph)
    return pw, ph


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


def cropped(image: Image.Image, size) -> Image.Image:
    """The result without the padding: its top-left ``size``."""
    return image.crop((0, 0, *size)) if size and image.size != tuple(size) else image
