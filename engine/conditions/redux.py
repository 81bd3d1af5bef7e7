"""FLUX.1-Redux: ``flux_redux_image`` (one PIL image or a list), an image prompt read by the transformer as text.

The seed (DiffSynth-Studio's ``FluxImageUnit_ReduxPromptEmbedder``) REPLACES the prompt: the text is zeros of
``t5_sequence_length`` tokens followed by the image's 729 tokens (``engine.redux.encode``), CLIP's pooled vector is
zeros, the text ids are zeros, and the CFG negative pass reads the same text. diffusers' ``FluxPriorReduxPipeline``
without text encoders makes the same text (zeros of 512 + image tokens). That is the default here, so CLIP and T5
are not needed (``replaces_prompt``).

Our additions:

- ``flux_redux_strength`` (1.0; a float, or one per image): multiplies the image tokens (0 to 2).
- ``flux_redux_keep_prompt`` (False): True appends the image tokens after the prompt's own T5 tokens and keeps
  CLIP's pooled vector of the prompt, as diffusers' prior pipeline does when given text encoders and a prompt; the
  negative pass then reads the negative prompt alone, so true CFG still steers away from it.

Several images: their tokens are concatenated in order (diffusers' prior sums a batch instead; the seed takes one).
"""
from __future__ import annotations

from numbers import Real
from typing import Mapping, Optional

import torch

from .. import latents as lat
from ..errors import EngineError
from ..redux.encode import check_loaded, encode_images
from .base import Condition, ConditionContext, Text, pil_images

TOKENS_PER_IMAGE = 729            # SigLIP so400m at 384x384: 27 x 27 patches
MAX_STRENGTH = 2.0


def image_list(value) -> list:
    """One image or a list/tuple of images -> list of PIL images (``conditions.base.pil_images``)."""
    return pil_images(value, "flux_redux_image")


def strength_list(value, count: int) -> list:
    """``flux_redux_strength``: one number for every image, or a list of one per image, each in [0, 2]."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise EngineError(f"flux_redux_strength has {len(values)} values for {count} image prompt(s): give one "
                          f"number, or one per image.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not (0.0 <= float(v) <= MAX_STRENGTH):
            raise EngineError(f"flux_redux_strength {v!r} is not a number from 0 to {MAX_STRENGTH:g} (1 is the "
                              f"image prompt as trained).")
    return [float(v) for v in values]


def _check_widths(pipe, tokens: torch.Tensor) -> None:
    """The embedder writes into the transformer's text space: its width must be the T5 width the DiT reads."""
    want = getattr(getattr(pipe.dit, "config", None), "joint_attention_dim", None)
    if want is not None and tokens.shape[-1] != want:
        raise EngineError(f"The FLUX.1-Redux embedder gives {tokens.shape[-1]}-wide tokens but the transformer reads "
                          f"{want}-wide text: these Redux files do not belong to this FLUX model.")


class ReduxCondition(Condition):
    name = "redux"
    call_args = {"flux_redux_image": None, "flux_redux_strength": 1.0, "flux_redux_keep_prompt": False}

    def __init__(self, tokens: torch.Tensor, keep_prompt: bool, seed_text: Text):
        self.tokens = tokens                      # (1, 729 x images, D) in the transformer's compute dtype
        self.keep_prompt = keep_prompt
        self.replaces_prompt = not keep_prompt
        self.seed_text = seed_text                # the seed's text (zeros + image tokens), both passes

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["ReduxCondition"]:
        images = image_list(args.get("flux_redux_image"))
        if not images:
            return None
        strengths = strength_list(args.get("flux_redux_strength", 1.0), len(images))
        keep = bool(args.get("flux_redux_keep_prompt", False))
        check_loaded(ctx.pipe)
        tokens = encode_images(ctx.pipe, images, strengths)
        _check_widths(ctx.pipe, tokens)
        tokens = tokens.to(device=ctx.device, dtype=ctx.dtype)
        pooled_width = int(getattr(ctx.pipe.dit.config, "pooled_projection_dim", 768))
        zeros = torch.zeros(1, ctx.t5_sequence_length, tokens.shape[-1], device=ctx.device, dtype=ctx.dtype)
        embeds = torch.cat([zeros, tokens], dim=1)
        seed_text = Text(embeds, torch.zeros(1, pooled_width, device=ctx.device, dtype=ctx.dtype),
                         lat.text_ids(embeds.shape[1], device=ctx.device))
        return cls(tokens, keep, seed_text)

    @classmethod
    def extra_tokens(cls, args: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
        # the image tokens follow t5_sequence_length tokens (the prompt's, or the seed's zeros) either way
        value = args.get("flux_redux_image")
        if value is None:
            return 0
        return TOKENS_PER_IMAGE * (len(value) if isinstance(value, (list, tuple)) else 1)

    def prompt_text(self, text: Optional[Text], step: int, negative: bool) -> Optional[Text]:
        if not self.keep_prompt or text is None:   # (None: another condition replaced the prompt, none to keep)
            return self.seed_text
        if negative:
            return text                           # the negative prompt alone: CFG steers away from it
        ids = torch.cat([text.ids, lat.text_ids(self.tokens.shape[1], device=text.ids.device,
                                                dtype=text.ids.dtype)], dim=0)
        return Text(torch.cat([text.embeds, self.tokens.to(text.embeds.dtype)], dim=1), text.pooled, ids)


__all__ = ["ReduxCondition", "image_list", "strength_list", "TOKENS_PER_IMAGE"]
