"""FLUX 3 Image Klein's reference images (``edit_image``): checked, sized, and laid out as their own token stream.

Sizing follows BFL's released code as diffusers' ``Flux3ImageProcessor`` implements it (used here, so the pixels are
the library's): ONE reference is kept whole -- downscaled only if its canvas (its size rounded up to 16 pixels) is over
4 megapixels, then reflect-padded to that canvas; SEVERAL are each downscaled (Lanczos) to at most 1 megapixel and
centre-cropped to multiples of 16. (DiffSynth-Studio's FLUX 3 sizing is not visible offline; its FLUX.2 resize to
about 1024x1024 is not used here.) ``auto_resize=False`` keeps every reference's own pixels, centre-cropped to
multiples of 16 (an image under 16 pixels a side is refused). The output size stays the caller's ``height`` x
``width`` (the seed's API has no "size of the reference" default; diffusers crops a padded single reference back only
when no size is given).

Each reference is VAE-encoded like an input image (the posterior mean, 2x2 patchified, normalised by the VAE's ``bn``
statistics) and reference i (from 0) gets position ids (0, 0.5*row, 0.5*col, -(i + 1)): its own stream
(``image_cond_hidden_states`` / ``image_cond_ids`` of the transformer, modulated at timestep 0 -- plus, for the
distilled model, the step's target timestep), as diffusers' ``Flux3PrepareImageCondLatentsStep`` and the seed do.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import EngineError
from . import schedule as sch

MAX_REFERENCES = 10


def as_list(edit_image) -> list:
    """``edit_image`` (None, one PIL image or a list/tuple of them) -> a checked list of at most 10 images."""
    if edit_image is None:
        return []
    images = list(edit_image) if isinstance(edit_image, (list, tuple)) else [edit_image]
    if len(images) > MAX_REFERENCES:
        raise EngineError(f"FLUX 3 Image Klein takes at most {MAX_REFERENCES} reference images (edit_image); got "
                          f"{len(images)}. Remove {len(images) - MAX_REFERENCES}.")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise EngineError(f"edit_image[{i}] is a {type(image).__name__}, not a PIL image: open it with "
                              f"PIL.Image.open(...) first.")
    return images


def _processor():
    from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor
    return Flux3ImageProcessor(vae_scale_factor=sch.CELL)


def _own_size(image: Image.Image) -> torch.Tensor:
    """The image's own pixels, centre-cropped to multiples of 16, as (1, 3, H, W) in [-1, 1]."""
    w, h = image.size
    tw, th = w // sch.CELL * sch.CELL, h // sch.CELL * sch.CELL
    if tw < sch.CELL or th < sch.CELL:
        raise EngineError(f"A reference image of {w}x{h} is too small: FLUX 3 needs at least {sch.CELL}x{sch.CELL}.")
    left, top = (w - tw) // 2, (h - th) // 2
    image = image.convert("RGB").crop((left, top, left + tw, top + th))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def pixels(images: list, auto_resize: bool = True) -> list:
    """The references as the VAE gets them: a list of (1, 3, H_i, W_i) float32 tensors in [-1, 1]."""
    if not images:
        return []
    if not auto_resize:
        return [_own_size(image) for image in images]
    processor = _processor()
    mode = "fill" if len(images) == 1 else "crop"
    return [processor.preprocess(image.convert("RGB"), resize_mode=mode)[0].float() for image in images]


def sizes(edit_image, auto_resize: bool = True) -> list:
    """(width, height) of each reference as the model gets it (for token counts and the memory plan)."""
    return [(int(t.shape[-1]), int(t.shape[-2])) for t in pixels(as_list(edit_image), auto_resize)]


def layout(grids: list, device=None):
    """Encoded reference grids (1, 128, h_i, w_i) -> (tokens (1, N, 128), ids (N, 4)), reference i at index -(i+1)."""
    tokens = [sch.to_tokens(g) for g in grids]
    ids = [sch.image_ids(g.shape[-2], g.shape[-1], index=-(i + 1), device=device) for i, g in enumerate(grids)]
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)
