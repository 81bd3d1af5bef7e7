"""Image prompts -> FLUX.1-Redux tokens, as the seed's ``FluxImageUnit_ReduxPromptEmbedder`` makes them.

Each image: RGB, resized to SigLIP's input size (384x384 for so400m) with PIL's bicubic filter, scaled to [-1, 1]
(SigLIP's mean and std of 0.5), then SigLIP's vision tower (``last_hidden_state``: 729 tokens x 1152) and the
embedder (-> 729 x 4096, T5's token space). Both models run through ``pipe.run_model`` in their placements' compute
device and dtype (an offloaded one is moved in for the stage). Several images: their tokens are concatenated in
order, each multiplied by its strength.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import EngineError
from . import EMBEDDER_PATTERN, ENCODER_PATTERN, REDUX_MODEL_ID
from .model import embed

ENCODER, EMBEDDER = "flux_redux_image_encoder", "flux_redux_image_embedder"
MISSING = {ENCODER: f'ModelConfig(model_id="{REDUX_MODEL_ID}", origin_file_pattern="{ENCODER_PATTERN}")',
           EMBEDDER: f'ModelConfig(model_id="{REDUX_MODEL_ID}", origin_file_pattern="{EMBEDDER_PATTERN}")'}


def check_loaded(pipe) -> None:
    """An EngineError naming the ModelConfigs to add when FLUX.1-Redux's files are not loaded."""
    missing = [role for role in (ENCODER, EMBEDDER) if getattr(pipe, role, None) is None]
    if missing:
        raise EngineError("flux_redux_image needs FLUX.1-Redux's image encoder and image embedder, and "
                          f"{' and '.join('the ' + r.split('_')[-1] for r in missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not loaded: add "
                          f"{' and '.join(MISSING[r] for r in missing)} to from_pretrained's model_configs.")


def input_size(encoder) -> int:
    """The square size SigLIP reads (its config's ``image_size``: 384 for so400m)."""
    return int(getattr(getattr(encoder, "config", None), "image_size", 384) or 384)


def image_to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """PIL -> (1, 3, size, size) float32 in [-1, 1], resized with the bicubic filter as the seed does."""
    image = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (x * 2.0 - 1.0).permute(2, 0, 1).unsqueeze(0)


def _place(pipe, role):
    place = getattr(pipe, "placements", {}).get(role)
    if place is None:
        return pipe.device, pipe.torch_dtype
    return place.compute_device, place.compute_dtype


def encode_images(pipe, images: Sequence[Image.Image], strengths: Sequence[float]) -> torch.Tensor:
    """(1, 729 x len(images), D) float32 tokens on the CPU: each image's embedded SigLIP tokens times its strength."""
    check_loaded(pipe)
    enc, emb = pipe.flux_redux_image_encoder, pipe.flux_redux_image_embedder
    enc_device, enc_dtype = _place(pipe, ENCODER)
    emb_device, emb_dtype = _place(pipe, EMBEDDER)
    size = input_size(enc)
    out = []
    for image, strength in zip(images, strengths):
        pixels = image_to_pixels(image, size).to(device=enc_device, dtype=enc_dtype)
        hidden = pipe.run_model(ENCODER, enc, lambda m: m(pixel_values=pixels).last_hidden_state)
        hidden = hidden.to(device=emb_device, dtype=emb_dtype)
        tokens = pipe.run_model(EMBEDDER, emb, lambda m: embed(m, hidden))
        out.append(tokens.float().cpu() * float(strength))
    return torch.cat(out, dim=1)


__all__ = ["ENCODER", "EMBEDDER", "check_loaded", "encode_images", "image_to_pixels", "input_size"]
