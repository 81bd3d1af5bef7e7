"""Reference images -> the per-block keys and values of the IP-Adapter, as DiffSynth-Studio's
``FluxImageUnit_IPAdapter`` makes them.

Each image: RGB, resized to 384x384 with PIL's bicubic filter, to a tensor in the encoder's dtype, then
``x * 2/255 - 1`` (the seed's ``preprocess_image``), SigLIP's vision tower -> ``pooler_output`` (one vector per
image). The image projection turns the N vectors into N x 128 tokens, joined into ONE sequence (DiffSynth-Studio's
``view(1, -1, 4096)``): every block then attends over all N x 128 tokens at once, so several images blend through one
softmax (a weighted average of what each image says, not a sum of N separate terms). Each block's ``to_k_ip`` /
``to_v_ip`` make its keys (RMS-normed per head) and values once per call; the loop only reads them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import EngineError
from .model import ADAPTER_ROLE, ENCODER_ROLE, check_pair, head_layout

ADAPTER_ID, ADAPTER_FILE = "InstantX/FLUX.1-dev-IP-Adapter", "ip-adapter.bin"
SIGLIP_ID, SIGLIP_FILE = "google/siglip-so400m-patch14-384", "model.safetensors"
MISSING = {ADAPTER_ROLE: f'ModelConfig(model_id="{ADAPTER_ID}", origin_file_pattern="{ADAPTER_FILE}")',
           ENCODER_ROLE: f'ModelConfig(model_id="{SIGLIP_ID}", origin_file_pattern="{SIGLIP_FILE}")'}
WHAT = {ADAPTER_ROLE: "the IP-Adapter (ip-adapter.bin)", ENCODER_ROLE: "its SigLIP image encoder (so400m)"}


def check_loaded(pipe) -> None:
    """An EngineError naming the ModelConfigs to add when the IP-Adapter's files are not loaded."""
    missing = [role for role in (ADAPTER_ROLE, ENCODER_ROLE) if getattr(pipe, role, None) is None]
    if missing:
        raise EngineError(f"ipadapter_images needs InstantX's IP-Adapter and its SigLIP image encoder, and "
                          f"{' and '.join(WHAT[r] for r in missing)} {'is' if len(missing) == 1 else 'are'} not "
                          f"loaded: add {' and '.join(MISSING[r] for r in missing)} to from_pretrained's "
                          f"model_configs (the files go in models/{ADAPTER_ID}/ and models/{SIGLIP_ID}/).")


def check_transformer(pipe) -> tuple:
    """(heads, head_dim) of the transformer, after checking the IP-Adapter was made for its blocks and width."""
    heads, head_dim, blocks = head_layout(pipe.dit)
    cfg = pipe.ipadapter.config
    if cfg["blocks"] != blocks or cfg["inner_dim"] != heads * head_dim:
        raise EngineError(f"The IP-Adapter has {cfg['blocks']} blocks of {cfg['inner_dim']} wide keys, but the "
                          f"transformer has {blocks} blocks {heads * head_dim} wide: this IP-Adapter was made for "
                          f"another model (InstantX's is for FLUX.1-dev: 19 + 38 blocks, 3072 wide).")
    check_pair(pipe.ipadapter_image_encoder, pipe.ipadapter)
    return heads, head_dim


def input_size(encoder) -> int:
    return int(getattr(getattr(encoder, "config", None), "image_size", 384) or 384)


def image_to_pixels(image: Image.Image, size: int, dtype) -> torch.Tensor:
    """PIL -> (1, 3, size, size) in [-1, 1]: bicubic resize, then the seed's order (to ``dtype``, then scale)."""
    image = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.float32)).to(dtype)
    return (x * (2.0 / 255) - 1.0).permute(2, 0, 1).unsqueeze(0)


def _place(pipe, role):
    place = getattr(pipe, "placements", {}).get(role)
    if place is None:
        return pipe.device, pipe.torch_dtype
    return place.compute_device, place.compute_dtype


def pooled(pipe, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, width) SigLIP pooled vectors of the images (one batch, as the seed)."""
    enc = pipe.ipadapter_image_encoder
    device, dtype = _place(pipe, ENCODER_ROLE)
    size = input_size(enc)
    pixels = torch.cat([image_to_pixels(im, size, dtype) for im in images]).to(device)
    return pipe.run_model(ENCODER_ROLE, enc, lambda m: m(pixel_values=pixels).pooler_output)


def keys_values(pipe, vectors: torch.Tensor, heads: int, device, dtype) -> tuple:
    """Per block (keys, values) for these pooled vectors, moved to the transformer's device and dtype."""
    ada = pipe.ipadapter
    a_device, a_dtype = _place(pipe, ADAPTER_ROLE)
    x = vectors.to(device=a_device, dtype=a_dtype)

    def run(m):
        return m.keys_values(m.tokens(x), heads)

    ks, vs = pipe.run_model(ADAPTER_ROLE, ada, run)
    return [k.to(device=device, dtype=dtype) for k in ks], [v.to(device=device, dtype=dtype) for v in vs]


__all__ = ["ADAPTER_FILE", "ADAPTER_ID", "SIGLIP_FILE", "SIGLIP_ID", "check_loaded", "check_transformer",
           "image_to_pixels", "input_size", "keys_values", "pooled"]
