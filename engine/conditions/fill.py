"""FLUX.1-Fill: the masked image and the mask as 320 extra features of every image token.

FLUX.1-Fill-dev's transformer takes 384 features per token: the 64 of the noisy latents, then

- 64: the VAE latents of the image with the painted area blanked, packed 2x2 like the latents. Blanking happens in
  pixel space on the [-1, 1] image (``image * (1 - mask)``), so a masked pixel is 0, mid-grey;
- 256: the full-resolution mask, each 8x8 pixel cell folded into 64 channels (channel ``8 * dy + dx``), then packed
  2x2 like the latents.

The mask is read as BFL's reference code, diffusers' ``FluxFillPipeline`` and DiffSynth-Studio's
``FluxImageUnit_FillCondition`` read it: grayscale, resized (Lanczos) to the output size, binarised at 0.5;
white (1) = repaint, black (0) = keep. The image is resized (Lanczos) to the output size as well. The features do
not change from step to step.

Unlike DiffSynth-Studio, which gives a Fill transformer an all-masked blank condition when the image or the mask is
missing (so it silently generates from nothing), the engine refuses: a Fill model without its inputs is a mistake.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from .base import Condition, ConditionContext, in_channels

FILL_IN_CHANNELS = 384          # 64 latent + 64 masked-image + 256 mask features
FILL_FEATURES = FILL_IN_CHANNELS - 64


class FillCondition(Condition):
    """``pipe(flux_fill_image=..., flux_fill_mask=...)``: the same 320 features at every step."""

    name = "fill"
    call_args = {"flux_fill_image": None, "flux_fill_mask": None}

    def __init__(self, features: torch.Tensor):
        self._features = features

    @classmethod
    def requested(cls, args: Mapping, pipe) -> bool:
        # A Fill transformer always needs its inputs: asked for so that their absence is refused by name.
        return super().requested(args, pipe) or in_channels(pipe) == FILL_IN_CHANNELS

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> "FillCondition":
        return fill_condition(ctx, args["flux_fill_image"], args["flux_fill_mask"])

    def features(self, step: int) -> torch.Tensor:
        return self._features


def fill_condition(ctx: ConditionContext, image, mask) -> FillCondition:
    """The FLUX.1-Fill condition for ``pipe(flux_fill_image=image, flux_fill_mask=mask)``."""
    channels = in_channels(ctx.pipe)
    if channels != FILL_IN_CHANNELS:
        raise EngineError(f"flux_fill_image / flux_fill_mask need the FLUX.1-Fill-dev transformer "
                          f"(flux1-fill-dev.safetensors); the loaded one takes {channels} input features, not "
                          f"{FILL_IN_CHANNELS}. Load FLUX.1-Fill-dev, or use flex_inpaint_* with Flex.2-preview.")
    if image is None or mask is None:
        missing = " and ".join(n for n, v in (("flux_fill_image", image), ("flux_fill_mask", mask)) if v is None)
        raise EngineError(f"FLUX.1-Fill-dev repaints part of an image: pass flux_fill_image (the image) and "
                          f"flux_fill_mask (white = repaint); {missing} missing.")
    for name, value in (("flux_fill_image", image), ("flux_fill_mask", mask)):
        if not isinstance(value, Image.Image):
            raise EngineError(f"{name} is a {type(value).__name__}, not a PIL image; open it with PIL.Image.open.")
    # Kept where and as the transformer computes: the same features every step.
    return FillCondition(fill_features(ctx, image, mask).to(device=ctx.device, dtype=ctx.dtype))


def fill_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 1, H, W) float32 of 0 (keep) and 1 (repaint): grayscale, Lanczos-resized, binarised at 0.5."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    values = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((values >= 0.5).astype(np.float32))[None, None]


def fill_features(ctx: ConditionContext, image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """(1, N, 320) float32: packed masked-image latents, then the packed 8x8-folded mask."""
    width, height = ctx.width, ctx.height
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    binary = fill_mask(mask, width, height)
    masked = lat.image_to_tensor(image) * (1.0 - binary)
    # A tensor, not a PIL image: the blanked pixels are exactly 0, which 8 bits cannot hold.
    masked_latents = ctx.encode_image(masked).float().cpu()
    lh, lw = height // lat.VAE_FACTOR, width // lat.VAE_FACTOR
    folded = binary[:, 0].view(1, lh, lat.VAE_FACTOR, lw, lat.VAE_FACTOR).permute(0, 2, 4, 1, 3)
    folded = folded.reshape(1, lat.VAE_FACTOR * lat.VAE_FACTOR, lh, lw)
    return torch.cat([lat.pack(masked_latents), lat.pack(folded)], dim=-1)
