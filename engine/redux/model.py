"""FLUX.1-Redux's two files onto the field's classes, architecture from tensor shapes.

- ``image_encoder/model.safetensors``: SigLIP-so400m's vision tower alone (``vision_model.*`` keys, with the MAP
  head ``vision_model.head.*``) -> transformers' ``SiglipVisionModel``. Hidden width, patch size, layers and MLP
  width come from the shapes, the image size from the number of positions (729 = 27 x 27 patches of 14 -> 384).
  The number of heads is not in any shape: a ``config.json`` beside the file gives it, else SigLIP's head width
  of 72 does (so400m: 1152 / 72 = 16 heads).
- ``image_embedder/diffusion_pytorch_model.safetensors``: ``redux_up`` / ``redux_down`` -> diffusers'
  ``ReduxImageEncoder`` (``redux_down(silu(redux_up(x)))``: 1152 -> 12288 -> 4096, the T5 width).

How a SigLIP file is told from a CLIP one (the two share ``text_model.*`` / ``vision_model.*`` names): SigLIP's
patch embedding has a bias and it has no class token; CLIP's vision tower has ``class_embedding`` and
``pre_layrnorm`` and a bias-free patch embedding; SigLIP's text tower ends in ``head.*``, CLIP's does not.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Optional

import torch

from ..loading.errors import ModelFileError

VISION = "vision_model."
PATCH_BIAS = VISION + "embeddings.patch_embedding.bias"
PATCH_WEIGHT = VISION + "embeddings.patch_embedding.weight"
POSITIONS = VISION + "embeddings.position_embedding.weight"
CLASS_TOKEN = VISION + "embeddings.class_embedding"
SIGLIP_HEAD_WIDTH = 72          # so400m: 1152 wide, 16 heads; used when no config.json says otherwise
EMBEDDER_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")


# ------------------------------------------------------------------------------------------------ detection
def is_siglip_vision(keys) -> bool:
    """A SigLIP vision tower on its own (FLUX.1-Redux's image_encoder): only ``vision_model.*`` keys, a biased patch
    embedding, no class token (CLIP's vision tower has one and a bias-free patch embedding)."""
    ks = set(keys)
    return (bool(ks) and all(k.startswith(VISION) for k in ks) and {PATCH_WEIGHT, PATCH_BIAS, POSITIONS} <= ks
            and CLASS_TOKEN not in ks and VISION + "pre_layrnorm.weight" not in ks)


def is_full_siglip(keys) -> bool:
    """A whole SiglipModel (text + vision towers, ``logit_bias``), as google/siglip-so400m-patch14-384 ships it."""
    ks = set(keys)
    return "logit_bias" in ks or ("text_model.head.weight" in ks and PATCH_BIAS in ks)


def is_redux_embedder(keys) -> bool:
    return set(EMBEDDER_KEYS[::2]) <= set(keys)


# ------------------------------------------------------------------------------------------------ SigLIP tower
def _shape(sd, key) -> tuple:
    if key not in sd:
        raise ModelFileError(f"the SigLIP vision tower has no {key}.")
    return tuple(sd[key].shape)


def infer_siglip_config(sd, config_json: Optional[dict] = None) -> dict:
    """``SiglipVisionConfig`` arguments of a ``vision_model.*`` state dict (a ``config.json`` beside it may give the
    heads, activation and norm epsilon; shapes always win for the widths)."""
    hidden, channels, patch, _ = _shape(sd, PATCH_WEIGHT)
    positions = _shape(sd, POSITIONS)[0]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ModelFileError(f"the SigLIP vision tower has {positions} positions, not a square grid of patches.")
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)] if m}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ModelFileError(f"the SigLIP vision tower's layers are not numbered 0..n-1 ({sorted(layers)[:5]}...).")
    inter = _shape(sd, VISION + "encoder.layers.0.mlp.fc1.weight")[0]
    # The patches cover side*patch pixels; SigLIP's published sizes are multiples of 16 (so400m: 27 patches of 14
    # come from 384, the rest of the image falls off the last patch's edge), so round up while the count holds.
    image_size = -(-side * patch // 16) * 16
    if image_size // patch != side:
        image_size = side * patch
    cfg = dict(config_json or {})
    if cfg.get("model_type") == "siglip":              # a SiglipModel config.json nests the vision part
        vision_cfg = dict(cfg.get("vision_config") or {})
    else:                                             # a config.json of another kind says nothing of this tower
        vision_cfg = cfg if cfg.get("model_type") == "siglip_vision_model" else {}
    heads = vision_cfg.get("num_attention_heads")
    if not heads:
        width = next((w for w in (SIGLIP_HEAD_WIDTH, 64, 32, 16, 8) if hidden % w == 0), hidden)
        heads = hidden // width
    if hidden % heads:
        raise ModelFileError(f"the SigLIP vision tower is {hidden} wide, which {heads} heads do not divide.")
    image_size = int(vision_cfg.get("image_size", image_size))
    if image_size // patch != side:
        raise ModelFileError(f"config.json's image_size {image_size} does not give the file's {side}x{side} patches "
                             f"of {patch}.")
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=len(layers),
                num_attention_heads=int(heads), num_channels=channels, image_size=image_size, patch_size=patch,
                hidden_act=vision_cfg.get("hidden_act", "gelu_pytorch_tanh"),
                layer_norm_eps=float(vision_cfg.get("layer_norm_eps", 1e-6)),
                vision_use_head=VISION + "head.probe" in sd)


def build_siglip(cfg: dict) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel
    return SiglipVisionModel(SiglipVisionConfig(**cfg))


@functools.lru_cache(maxsize=1)
def modules_keep_prefix() -> bool:
    """Whether transformers' ``SiglipVisionModel`` names its tensors ``vision_model.*`` as the file does (4.x) or
    without the prefix (5.x strips it inside ``from_pretrained`` only)."""
    tiny = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=4,
                patch_size=2)
    with torch.device("meta"):
        return any(k.startswith(VISION) for k in build_siglip(tiny).state_dict())


def convert_siglip(sd) -> dict:
    """The file's ``vision_model.*`` keys -> ``SiglipVisionModel``'s names (same tensors)."""
    if modules_keep_prefix():
        return dict(sd)
    return {k[len(VISION):]: v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ embedder
def infer_embedder_config(sd) -> dict:
    """``ReduxImageEncoder`` arguments: ``redux_dim`` (SigLIP's width) and ``txt_in_features`` (the T5 width)."""
    missing = [k for k in EMBEDDER_KEYS if k not in sd]
    if missing:
        raise ModelFileError(f"the Redux image embedder has no {', '.join(missing)}.")
    up, down = tuple(sd["redux_up.weight"].shape), tuple(sd["redux_down.weight"].shape)
    if len(up) != 2 or len(down) != 2 or down[1] != up[0] or up[0] != 3 * down[0]:
        raise ModelFileError(f"the Redux image embedder's shapes do not fit redux_down(silu(redux_up(x))) with a "
                             f"3x wider middle: redux_up {list(up)}, redux_down {list(down)}.")
    return dict(redux_dim=up[1], txt_in_features=down[0])


def build_embedder(cfg: dict) -> torch.nn.Module:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    return ReduxImageEncoder(**cfg)


def embed(embedder: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The embedder's tokens, whether it returns diffusers' output object or a tensor."""
    out = embedder(hidden)
    return getattr(out, "image_embeds", out)
