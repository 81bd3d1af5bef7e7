"""Extra inputs of the denoising loop (the seed's ``pipe(...)`` arguments beyond the prompt), one module each.

- ``kontext``: reference images as extra tokens in the sequence (FLUX.1 Kontext).
- ``controlnet``: ``controlnet_inputs=[ControlNetInput(...)]``: residuals added to the transformer's blocks.
- ``fill``: ``flux_fill_image`` / ``flux_fill_mask``: FLUX.1-Fill's masked-image and mask features.
- ``flex``: ``flex_inpaint_image`` / ``flex_inpaint_mask`` / ``flex_control_image`` ...: Flex.2's features.

(Interim: the conditions are being converted to the new interface of ``base.py``.)
"""
from __future__ import annotations

from .base import Condition, ConditionContext, in_channels, merge_dit_kwargs


def build_conditions(ctx: ConditionContext, controlnet_inputs=None, flux_fill_image=None, flux_fill_mask=None,
                     flex_inpaint_image=None, flex_inpaint_mask=None, flex_control_image=None,
                     flex_control_strength: float = 0.5, flex_control_stop: float = 0.5) -> list:
    """The conditions one ``pipe(...)`` call asks for, prepared (images encoded) for ``ctx``."""
    out = []
    if controlnet_inputs:
        from .controlnet import controlnet_condition
        out.append(controlnet_condition(ctx, controlnet_inputs))
    if flux_fill_image is not None or flux_fill_mask is not None or in_channels(ctx.pipe) == 384:
        from .fill import fill_condition
        out.append(fill_condition(ctx, flux_fill_image, flux_fill_mask))
    if any(x is not None for x in (flex_inpaint_image, flex_inpaint_mask, flex_control_image)) or \
            in_channels(ctx.pipe) == 196:
        from .flex import flex_condition
        out.append(flex_condition(ctx, flex_inpaint_image, flex_inpaint_mask, flex_control_image,
                                  flex_control_strength, flex_control_stop))
    return out


__all__ = ["Condition", "ConditionContext", "build_conditions", "merge_dit_kwargs"]
