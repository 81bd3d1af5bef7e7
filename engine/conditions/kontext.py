"""FLUX.1 Kontext: reference images as extra tokens in the transformer's input sequence.

Each reference image is VAE-encoded (posterior mean, like every image the engine encodes), packed into 2x2
tokens and appended after the generated image's tokens. Its position ids are ``[1, row, col]``: the first
coordinate 1 marks a reference (the generated image has 0), rows and columns start at 0, exactly as BFL's
``prepare_kontext``, diffusers' ``FluxKontextPipeline`` and DiffSynth-Studio's ``FluxImageUnit_Kontext`` build
them. The transformer returns a velocity for the whole sequence; only the first ``num_image_tokens`` rows
(the generated image) are kept for the Euler step, the reference tokens stay clean and constant.

Several references: DiffSynth-Studio (the seed) gives every reference the same ids ``[1, row, col]`` (all at
index 1, no spatial offset) and concatenates them in order; diffusers' Kontext pipeline takes one image only.
We follow the seed.

Sizes: the output size is whatever the caller asks for; a reference keeps its own size (as in the seed,
which encodes the image as given), so its token grid may differ from the output's. A size that is not a
multiple of 16 is rounded up to the next multiple (the engine's one rounding rule, ``engine.sizes``; a
reference may be smaller than an output's 64-pixel minimum) and the image is resized to it -- a stretch of at most 15 pixels per side, never a crop. diffusers instead
resizes the reference to one of Kontext's preferred training resolutions (``_auto_resize``); that is the
caller's choice here (pass an already resized image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from ..sizes import MAX_SIZE, MULTIPLE
from .base import Condition, ConditionContext, ImageTokens, pil_images

REFERENCE_INDEX = 1.0


@dataclass
class KontextTokens:
    tokens: torch.Tensor           # (1, N, 64) packed reference latents, float32
    ids: torch.Tensor              # (N, 3) position ids [1, row, col]
    sizes: list                    # [(width, height)] of each reference as encoded


def as_image_list(kontext_images) -> list:
    """``None``, one image or a list/tuple of images -> list of PIL images (empty when none)."""
    return pil_images(kontext_images, "kontext_images")


def prepare_reference(image: Image.Image) -> Image.Image:
    """RGB, its size rounded up to multiples of 16 (resized, never cropped)."""
    image = image.convert("RGB")
    w, h = image.size
    if max(w, h) > MAX_SIZE:
        raise EngineError(f"Kontext reference image {w}x{h} is larger than {MAX_SIZE} pixels on a side; "
                          f"read it with engine.images.load_user_image, which scales it down.")
    width, height = (-(-w // MULTIPLE) * MULTIPLE, -(-h // MULTIPLE) * MULTIPLE)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


def encode_references(kontext_images, encode: Callable[[Image.Image], torch.Tensor],
                      device=None) -> Union[KontextTokens, None]:
    """Encode the reference images with ``encode`` (PIL -> (1, 16, h, w) scaled latents) into tokens and ids.

    Returns None when there are no references.
    """
    images = as_image_list(kontext_images)
    if not images:
        return None
    tokens, ids, sizes = [], [], []
    for image in images:
        image = prepare_reference(image)
        width, height = image.size
        latents = encode(image).to(device)
        tokens.append(lat.pack(latents).float())
        ids.append(lat.image_ids(height, width, index=REFERENCE_INDEX, device=device))
        sizes.append((width, height))
    return KontextTokens(torch.cat(tokens, dim=1), torch.cat(ids, dim=0), sizes)


def reference_tokens(image) -> int:
    """Tokens one reference adds to the sequence (its size rounded up to multiples of 16); 0 for a non-image."""
    if not isinstance(image, Image.Image):
        return 0
    width, height = (-(-side // MULTIPLE) * MULTIPLE for side in image.size)
    return (width // lat.TOKEN_FACTOR) * (height // lat.TOKEN_FACTOR)


class KontextCondition(Condition):
    """``pipe(kontext_images=...)``: the references' clean tokens appended after the generated image's."""

    name = "kontext"
    call_args = {"kontext_images": None}

    def __init__(self, references: KontextTokens):
        self.references = references

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["KontextCondition"]:
        refs = encode_references(args["kontext_images"], ctx.encode_image, device=ctx.device)
        return None if refs is None else cls(refs)

    @classmethod
    def extra_tokens(cls, args: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
        images = args.get("kontext_images")
        images = images if isinstance(images, (list, tuple)) else [images]
        return sum(reference_tokens(image) for image in images)

    def image_tokens(self) -> ImageTokens:
        return ImageTokens(self.references.tokens, self.references.ids)


def join(tokens: torch.Tensor, ids: torch.Tensor, kontext: Union[KontextTokens, None]):
    """The transformer's input: generated tokens then reference tokens, and their ids in the same order."""
    if kontext is None:
        return tokens, ids
    return (torch.cat([tokens, kontext.tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1),
            torch.cat([ids, kontext.ids.to(ids.dtype)], dim=0))


def generated_part(velocity: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """The velocity of the generated image's tokens (the references' part is dropped)."""
    return velocity[:, :num_image_tokens]
