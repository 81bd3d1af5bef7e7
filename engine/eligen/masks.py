"""EliGen's masks: entity regions on the latent / token grid and the joint attention mask (pure torch + PIL).

Reading a mask follows the seed (DiffSynth-Studio's ``FluxImageUnit_EntityControl.preprocess_masks``): the mask is
resized straight to the latent grid (height/8 x width/8) with nearest-neighbour, so a mask of another size or shape
is stretched to the output, and a latent cell belongs to the entity where the mean of its R, G, B is above half
(white = the entity's region). A layer with transparency (what a painting widget returns) counts by its alpha
instead. An image token (a 2x2 patch of latent cells) belongs to the entity when any of its four cells does (the seed
sums the patchified mask and tests > 0).

The joint attention mask covers the sequence the transformer attends over, text first, then image, as diffusers'
``FluxAttnProcessor`` concatenates it: ``[entity 1 tokens | ... | entity N tokens | global prompt | image tokens]``.
``True`` = may attend. Following the seed's ``FluxDiT.construct_mask``, with the global prompt treated as one more
entity whose region is the whole image:

- entity prompt rows see their own prompt and their region's image tokens only;
- global prompt rows see the global prompt and every image token;
- image rows see every image token, the global prompt, and the prompt of every entity whose region contains them
  (so where regions overlap, an image token sees both entities' prompts);
- prompts never see each other (entity <-> entity and entity <-> global are blocked both ways).

Image-side tokens beyond the generated image (FLUX.1 Kontext's reference tokens) are in no entity's region: they see
the global prompt and all image tokens, like any image token outside every mask. (The seed has no such tokens.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .. import latents as lat


def _rgb(mask: Image.Image) -> Image.Image:
    """The RGB image the seed reads; a painted layer (with transparency) is read by its alpha."""
    if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.convert("RGB")
    return mask.convert("RGB")


def _above_half(rgb: Image.Image) -> np.ndarray:
    # The seed maps 0..255 to -1..1 and tests the channel mean > 0: mean > 127.5, i.e. R + G + B > 382.5.
    return np.asarray(rgb, dtype=np.int32).sum(axis=2) * 2 > 765


def latent_region(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """(height/8, width/8) bool: the latent cells in the mask's region (nearest-neighbour resize, as the seed)."""
    size = (width // lat.VAE_FACTOR, height // lat.VAE_FACTOR)
    return torch.from_numpy(_above_half(_rgb(mask).resize(size, Image.NEAREST)))


def token_region(cells: torch.Tensor) -> torch.Tensor:
    """(h, w) latent-cell bool -> (h/2 * w/2,) token bool in the packed order (row-major over 2x2 patches): a token
    is in the region when any of its four cells is."""
    h, w = cells.shape
    return cells.view(h // 2, 2, w // 2, 2).any(dim=3).any(dim=1).reshape(-1)


def entity_token_regions(masks: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """(N, image tokens) bool: each entity's region on the token grid."""
    return torch.stack([token_region(latent_region(m, height, width)) for m in masks])


def inpaint_region(masks: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """(height/8, width/8) bool: the union of the entity regions, the part EliGen's inpainting repaints.

    As the seed's inpainting (``prepare_entity_inputs`` with ``enable_eligen_inpaint``) computes it: each mask resized
    to the latent grid with PIL's default filter for RGB (bicubic), not nearest like the attention regions."""
    size = (width // lat.VAE_FACTOR, height // lat.VAE_FACTOR)
    union = np.zeros((size[1], size[0]), dtype=bool)
    for m in masks:
        union |= _above_half(_rgb(m).resize(size, Image.BICUBIC))
    return torch.from_numpy(union)


def joint_attention_mask(regions: torch.Tensor, prompt_len: int, num_image_tokens: int | None = None) -> torch.Tensor:
    """The (L, L) bool attention mask, L = (N + 1) * prompt_len + image tokens, for N entity ``regions``
    ((N, generated image tokens) bool). ``num_image_tokens`` (default: the regions' width) may be larger: the extra
    image-side tokens (Kontext references) belong to no entity. Row = query, column = key; True = may attend."""
    regions = regions.bool()
    n, gen = regions.shape
    img = gen if num_image_tokens is None else int(num_image_tokens)
    if img < gen:
        raise ValueError(f"num_image_tokens ({img}) is smaller than the regions' {gen} tokens")
    # The global prompt is one more entity covering the whole generated image; extra tokens are in no entity.
    cover = torch.zeros(n + 1, img, dtype=torch.bool, device=regions.device)
    cover[:n, :gen] = regions
    cover[n] = True
    text = (n + 1) * prompt_len
    owner = torch.arange(n + 1, device=regions.device).repeat_interleave(prompt_len)   # text token -> its prompt
    mask = torch.ones(text + img, text + img, dtype=torch.bool, device=regions.device)
    mask[:text, :text] = owner[:, None] == owner[None, :]          # each prompt sees itself only
    text_to_image = cover.repeat_interleave(prompt_len, dim=0)      # (text, img)
    mask[:text, text:] = text_to_image
    mask[text:, :text] = text_to_image.T
    return mask


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive bias scaled_dot_product_attention adds to the scores: 0 where allowed, -inf
    where not (the seed's form; built once per call instead of SDPA converting a bool mask in every layer)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, float("-inf"))
