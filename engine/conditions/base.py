"""The interface between the denoising loop and its extra inputs (``Condition``), and how several combine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from PIL import Image

# Keyword arguments of diffusers' FluxTransformer2DModel that several conditions may each give: summed (several
# ControlNets add their residuals, as diffusers' FluxMultiControlNetModel does).
SUMMED_KWARGS = ("controlnet_block_samples", "controlnet_single_block_samples")


@dataclass
class ConditionContext:
    """What a condition needs to prepare itself for one image."""

    pipe: object                                  # the FluxImagePipeline
    height: int
    width: int
    device: torch.device                          # where the transformer computes
    dtype: torch.dtype                            # the transformer's compute dtype
    sigmas: torch.Tensor                          # the schedule: steps + 1 values, sigmas[i] at step i
    # PIL (already at the size wanted), or a (1, 3, H, W) tensor in [-1, 1] (FLUX.1-Fill's masked image) -> VAE
    # latents (1, 16, h/8, w/8)
    encode_image: Callable[[Image.Image], torch.Tensor]

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


class Condition:
    """One extra input of the loop. Subclasses override what they use; the defaults add nothing."""

    name = "condition"

    def features(self, step: int) -> Optional[torch.Tensor]:
        """Packed features (1, N, C) concatenated after the 64 latent features of each image token at ``step``
        (FLUX.1-Fill: 320, Flex.2: 132); None adds nothing."""
        return None

    def dit_kwargs(self, step: int, *, latents: torch.Tensor, latent_ids: torch.Tensor, hidden_states: torch.Tensor,
                   image_ids: torch.Tensor, timestep: torch.Tensor, guidance: Optional[torch.Tensor],
                   pooled: torch.Tensor, text_embeds: torch.Tensor, text_ids: torch.Tensor, negative: bool) -> dict:
        """Extra keyword arguments of the transformer call at ``step`` (ControlNet residuals).

        ``latents`` (1, N, 64) / ``latent_ids`` (N, 3): the generated image's tokens and position ids alone (what a
        ControlNet takes); ``hidden_states`` / ``image_ids``: what the transformer gets (with other conditions'
        features and Kontext tokens); ``timestep`` is sigma; ``negative`` marks the CFG negative pass."""
        return {}


def merge_dit_kwargs(parts: list) -> dict:
    """Combine the conditions' transformer arguments: residual lists are summed element-wise; any other argument
    given twice is an error (two conditions cannot both set it)."""
    out: dict = {}
    for part in parts:
        for key, value in (part or {}).items():
            if key not in out:
                out[key] = value
            elif key in SUMMED_KWARGS:
                if out[key] is None:
                    out[key] = value
                elif value is not None:
                    if len(out[key]) != len(value):
                        raise ValueError(f"{key}: residual lists of different lengths ({len(out[key])}, {len(value)})")
                    out[key] = [a + b for a, b in zip(out[key], value)]
            else:
                raise ValueError(f"Two conditions both set the transformer's {key!r}.")
    return out


def build_conditions(ctx: ConditionContext, controlnet_inputs=None, flux_fill_image=None, flux_fill_mask=None,
                     flex_inpaint_image=None, flex_inpaint_mask=None, flex_control_image=None,
                     flex_control_strength: float = 0.5, flex_control_stop: float = 0.5) -> list:
    """The conditions one ``pipe(...)`` call asks for, prepared (images encoded) for ``ctx``."""
    out = []
    if controlnet_inputs:
        from .controlnet import controlnet_condition
        out.append(controlnet_condition(ctx, controlnet_inputs))
    if flux_fill_image is not None or flux_fill_mask is not None or _in_channels(ctx) == 384:
        from .fill import fill_condition
        out.append(fill_condition(ctx, flux_fill_image, flux_fill_mask))
    if any(x is not None for x in (flex_inpaint_image, flex_inpaint_mask, flex_control_image)) or \
            _in_channels(ctx) == 196:
        from .flex import flex_condition
        out.append(flex_condition(ctx, flex_inpaint_image, flex_inpaint_mask, flex_control_image,
                                  flex_control_strength, flex_control_stop))
    return out


def _in_channels(ctx: ConditionContext) -> int:
    """The transformer's input features per token: 64 (FLUX.1), 384 (FLUX.1-Fill: always needs its image and mask,
    and says so), 196 (Flex.2: always takes its 132 extra features, zeros when no image is given)."""
    dit = getattr(ctx.pipe, "dit", None)
    return int(getattr(getattr(dit, "config", None), "in_channels", 64) or 64)
