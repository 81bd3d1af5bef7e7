"""Extra inputs of the denoising loop (the seed's ``pipe(...)`` arguments beyond the prompt), one module each.

- ``kontext``: reference images as extra tokens in the sequence (FLUX.1 Kontext).
- ``controlnet``: ``controlnet_inputs=[ControlNetInput(...)]``: residuals added to the transformer's blocks.
- ``fill``: ``flux_fill_image`` / ``flux_fill_mask``: FLUX.1-Fill's masked-image and mask features.
- ``flex``: ``flex_inpaint_image`` / ``flex_inpaint_mask`` / ``flex_control_image`` ...: Flex.2's features.

Every one but Kontext is a ``Condition`` (``base.py``): prepared once per image (its images encoded), then asked
at every step for features to concatenate to the latent tokens and/or keyword arguments of the transformer call.
``build_conditions`` makes the list for one ``pipe(...)`` call from its keyword arguments.
"""
from __future__ import annotations

from .base import Condition, ConditionContext, build_conditions, merge_dit_kwargs

__all__ = ["Condition", "ConditionContext", "build_conditions", "merge_dit_kwargs"]
