"""FLUX.2's ``inpaint_mask``: repaint the masked part of ``input_image``, keep the rest on the input's own path.

DiffSynth-Studio's ``Flux2ImagePipeline`` does it in two places, and this module does the same:

1. **The mask as tokens** (its ``Flux2Unit_Inpaint``): the mask image, as RGB, resized (PIL's bicubic, the default
   for RGB) to the token grid (width/16 x height/16), scaled to [0, 1] and averaged over R, G, B; optionally blurred
   with a Gaussian of ``2 * inpaint_blur_size + 1`` taps and ``inpaint_blur_sigma`` (torchvision's ``GaussianBlur``:
   a normalised kernel sampled at integer offsets, reflected edges; both values needed, else no blur); then one
   value per token, (1, N, 1). White (1) = repaint, black (0) = keep. A painted layer with transparency (as the
   studio's editor and ``engine.masks`` read masks) gives its alpha; any other image is read as the seed reads it.
2. **The step** (``BasePipeline.step``): before each Euler step the (guided) velocity is blended with the velocity
   that leads back to the input's clean tokens, ``(x - clean) / sigma``: ``v = v_input * (1 - m) + v_model * m``.
   Where ``m = 0`` the tokens stay on the straight path from the input's noised tokens to its clean ones and end on
   them exactly; where ``m = 1`` the model paints.

It needs ``input_image`` (the clean tokens). The mask is kept in float32, like the pipeline's tokens (the seed holds
it in the pipeline's dtype).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import EngineError
from . import schedule as sch


def mask_image(mask) -> Image.Image:
    """The RGB image the seed reads a mask from: a painted layer with transparency gives its alpha (grey), any
    other image is itself."""
    from ..masks import to_mask
    if not isinstance(mask, Image.Image):
        raise EngineError(f"inpaint_mask must be a PIL image (white = repaint), got {type(mask).__name__}.")
    has_alpha = mask.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mask.mode == "P" and "transparency" in mask.info)
    return to_mask(mask).convert("RGB") if has_alpha else mask.convert("RGB")


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """(2 * size + 1,) taps of a Gaussian of ``sigma`` at offsets -size..size, summing to 1."""
    x = torch.arange(-size, size + 1, dtype=torch.float32)
    taps = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return taps / taps.sum()


def gaussian_blur(grid: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(1, 1, h, w) blurred by a (2 * size + 1)-tap Gaussian in each direction, edges reflected."""
    h, w = grid.shape[-2:]
    if size >= h or size >= w:
        raise EngineError(f"inpaint_blur_size {size} is too large for this image: its mask has {w}x{h} tokens (one "
                          f"per 16 pixels), so the blur size must be below {min(h, w)}.")
    kernel = gaussian_kernel(size, sigma).to(grid.device)
    x = F.pad(grid, (size, size, size, size), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def token_mask(mask, height: int, width: int, blur_size: Optional[int] = None, blur_sigma: Optional[float] = None,
               device=None) -> torch.Tensor:
    """(1, N, 1) float32: how much each of the image's N tokens is repainted (0 keep .. 1 repaint)."""
    h, w = height // sch.CELL, width // sch.CELL
    small = mask_image(mask).resize((w, h), Image.BICUBIC)
    grid = torch.from_numpy(np.asarray(small, dtype=np.float32)).permute(2, 0, 1)[None] * (1.0 / 255)
    grid = grid.mean(dim=1, keepdim=True)
    if blur_size is not None and blur_sigma is not None:
        size, sigma = int(blur_size), float(blur_sigma)
        if size < 0 or not sigma > 0 or not math.isfinite(sigma):
            raise EngineError(f"inpaint_blur_size must be 0 or more and inpaint_blur_sigma above 0, got {blur_size} "
                              f"and {blur_sigma}.")
        grid = gaussian_blur(grid, size, sigma)
    return sch.to_tokens(grid).to(device)


class InpaintBlend:
    """The masked step: ``velocity(v, tokens, sigma)`` is the velocity to step with."""

    def __init__(self, clean: torch.Tensor, mask: torch.Tensor):
        self.clean, self.mask = clean, mask.to(clean.device)

    @staticmethod
    def prepare(mask, clean: Optional[torch.Tensor], height: int, width: int, blur_size=None,
                blur_sigma=None) -> "InpaintBlend":
        if clean is None:
            raise EngineError("inpaint_mask repaints part of an input image: pass input_image=... as well (the "
                              "image whose unmasked part is kept).")
        return InpaintBlend(clean, token_mask(mask, height, width, blur_size, blur_sigma, clean.device))

    def velocity(self, v: torch.Tensor, tokens: torch.Tensor, sigma) -> torch.Tensor:
        towards_input = (tokens - self.clean) / float(sigma)
        return towards_input * (1 - self.mask) + v * self.mask
