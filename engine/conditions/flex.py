"""Flex.2-preview: inpainting and control as 132 extra features of every image token, as DiffSynth-Studio does.

ostris' Flex.2-preview transformer takes 196 features per token: the 64 of the noisy latents, then 33 latent-resolution
channels packed 2x2 like the latents (DiffSynth-Studio's ``FluxImageUnit_Flex`` and ``model_fn_flux_image``):

- 16: the inpaint image's VAE latents times ``1 - mask`` (blanked in latent space, after encoding the whole image);
  zeros without an image;
- 1: the inpaint mask, resized straight to the latent grid (PIL's default bicubic), its first channel scaled to
  [0, 1], not binarised; white (1) = repaint. All ones without a mask (repaint everything);
- 16: the control image's VAE latents times ``flex_control_strength``; zeros without a control image.

``flex_control_stop`` (a fraction of the steps; None means 1) ends the control: DiffSynth compares each step's
timestep with ``timesteps[int(stop * (steps - 1))]``, so steps ``0 .. int(stop * (steps - 1))`` get the control
latents and the later ones get zeros in their place (the inpaint part stays). The schedule's timesteps fall strictly,
so the comparison is this step index (DiffSynth compares bf16-rounded timesteps, which can keep the control a step
longer in bf16; fp32 DiffSynth and the engine agree). Both CFG passes get the same features, as in DiffSynth.

Images are resized (Lanczos) to the output size before encoding; DiffSynth requires them at that size already.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from .base import Condition, ConditionContext, in_channels

FLEX_IN_CHANNELS = 196          # 64 latent + 4 x (16 inpaint + 1 mask + 16 control)
FLEX_CHANNELS = 33


class FlexCondition(Condition):
    """``pipe(flex_inpaint_image=..., flex_inpaint_mask=..., flex_control_image=..., flex_control_strength=...,
    flex_control_stop=...)``: 132 features per step, the control part until ``last_control_step``."""

    name = "flex"
    call_args = {"flex_inpaint_image": None, "flex_inpaint_mask": None, "flex_control_image": None,
                 "flex_control_strength": 0.5, "flex_control_stop": 0.5}

    def __init__(self, with_control: torch.Tensor, without_control: torch.Tensor, last_control_step: int):
        self.with_control = with_control              # (1, N, 132) packed
        self.without_control = without_control        # the same with the control part zeroed
        self.last_control_step = last_control_step

    @classmethod
    def requested(cls, args: Mapping, pipe) -> bool:
        # A Flex.2 transformer always takes its 132 features (zeros and a full mask without inputs).
        return super().requested(args, pipe) or in_channels(pipe) == FLEX_IN_CHANNELS

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> "FlexCondition":
        return flex_condition(ctx, args["flex_inpaint_image"], args["flex_inpaint_mask"], args["flex_control_image"],
                              args["flex_control_strength"], args["flex_control_stop"])

    def features(self, step: int) -> torch.Tensor:
        return self.with_control if step <= self.last_control_step else self.without_control


def flex_condition(ctx: ConditionContext, inpaint_image=None, inpaint_mask=None, control_image=None,
                   strength: float = 0.5, stop: float = 0.5) -> FlexCondition:
    """The Flex.2 condition for ``pipe(flex_inpaint_image=..., flex_inpaint_mask=..., flex_control_image=...,
    flex_control_strength=..., flex_control_stop=...)``."""
    channels = in_channels(ctx.pipe)
    if channels != FLEX_IN_CHANNELS:
        raise EngineError(f"flex_inpaint_* / flex_control_image need the Flex.2-preview transformer "
                          f"(Flex.2-preview.safetensors); the loaded one takes {channels} input features, not "
                          f"{FLEX_IN_CHANNELS}. Load Flex.2-preview, or use flux_fill_* with FLUX.1-Fill-dev.")
    for name, value in (("flex_inpaint_image", inpaint_image), ("flex_inpaint_mask", inpaint_mask),
                        ("flex_control_image", control_image)):
        if value is not None and not isinstance(value, Image.Image):
            raise EngineError(f"{name} is a {type(value).__name__}, not a PIL image; open it with PIL.Image.open.")
    try:
        strength = float(strength)
        stop = 1.0 if stop is None else float(stop)
    except (TypeError, ValueError):
        raise EngineError(f"flex_control_strength and flex_control_stop must be numbers, got {strength!r} and "
                          f"{stop!r}.") from None
    if not 0.0 <= stop <= 1.0:
        raise EngineError(f"flex_control_stop is a fraction of the steps (0 to 1), got {stop:g}.")
    with_control, without_control = flex_latents(ctx, inpaint_image, inpaint_mask, control_image, strength)
    pack = lambda x: lat.pack(x).to(device=ctx.device, dtype=ctx.dtype)   # noqa: E731
    return FlexCondition(pack(with_control), pack(without_control), last_control_step(stop, ctx.steps))


def last_control_step(stop: float, steps: int) -> int:
    """The last step (0-based) that gets the control latents."""
    return int(stop * (steps - 1))


def flex_mask(mask: Image.Image, latent_width: int, latent_height: int) -> torch.Tensor:
    """(1, 1, h, w) float32 in [0, 1]: the mask's first channel resized to the latent grid."""
    if mask.mode not in ("L", "RGB"):
        mask = mask.convert("RGB")
    mask = mask.resize((latent_width, latent_height), Image.BICUBIC)
    values = np.asarray(mask, dtype=np.float32)
    if values.ndim == 3:
        values = values[..., 0]
    return torch.from_numpy(values / 255.0)[None, None]


def flex_latents(ctx: ConditionContext, inpaint_image, inpaint_mask, control_image, strength: float):
    """The 33-channel latent-resolution condition (1, 33, h, w) with and without the control part, float32."""
    lh, lw = ctx.height // lat.VAE_FACTOR, ctx.width // lat.VAE_FACTOR
    zeros = torch.zeros(1, lat.LATENT_CHANNELS, lh, lw)
    inpaint = zeros if inpaint_image is None else _encode(ctx, inpaint_image)
    mask = torch.ones(1, 1, lh, lw) if inpaint_mask is None else flex_mask(inpaint_mask, lw, lh)
    inpaint = inpaint * (1.0 - mask)
    control = zeros if control_image is None else _encode(ctx, control_image) * strength
    return torch.cat([inpaint, mask, control], dim=1), torch.cat([inpaint, mask, zeros], dim=1)


def _encode(ctx: ConditionContext, image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    if image.size != (ctx.width, ctx.height):
        image = image.resize((ctx.width, ctx.height), Image.LANCZOS)
    return ctx.encode_image(image).float().cpu()
