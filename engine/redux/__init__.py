"""FLUX.1-Redux: an image prompt. SigLIP's vision tower encodes the image (729 tokens at 384x384), the embedder maps
them into the T5 token space, and the transformer reads them as text (``engine.conditions.redux``).

- ``model``: the two official files onto transformers' ``SiglipVisionModel`` and diffusers' ``ReduxImageEncoder``
  (architecture from tensor shapes; how a SigLIP file is told from a CLIP one)
- ``encode``: images -> image-prompt tokens, through the pipeline's placements
- ``engine.demo.redux``: the random-weight demo files
"""
from ..registry import REDUX as REDUX_MODEL_ID
from ..registry import get_adapter
from .model import (build_embedder, build_siglip, convert_siglip, infer_embedder_config, infer_siglip_config,
                    is_full_siglip, is_redux_embedder, is_siglip_vision)

# The file patterns, from the catalogue's row (error messages name the ModelConfigs to add).
ENCODER_PATTERN = get_adapter("FLUX.1-Redux-dev").file("flux_redux_image_encoder").pattern
EMBEDDER_PATTERN = get_adapter("FLUX.1-Redux-dev").file("flux_redux_image_embedder").pattern

__all__ = ["REDUX_MODEL_ID", "ENCODER_PATTERN", "EMBEDDER_PATTERN", "build_embedder", "build_siglip",
           "convert_siglip", "infer_embedder_config", "infer_siglip_config", "is_full_siglip", "is_redux_embedder",
           "is_siglip_vision"]
