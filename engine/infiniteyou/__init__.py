"""ByteDance InfiniteYou (``infu_flux_v1.0/aes_stage2``): identity-preserving generation. A face embedding of the
identity photo (512-d ArcFace) goes through the image projector (a Perceiver resampler) to 8 tokens; InfuseNet, a
FLUX ControlNet of 4 + 10 blocks, reads those tokens as its text and adds its residuals to the transformer's blocks
(``engine.conditions.infiniteyou``).

- ``model``: the two files onto ``IdProjector`` (ours, the file's key names) and diffusers' ``FluxControlNetModel``
- ``face``: the identity photo -> 512-d embedding (``pipe.infinityou_face_embedder``; insightface by default, an
  optional extra), precomputed embeddings (.npy / tensor), the demo's stand-in
- ``load``: picking the two files out of ``from_pretrained``'s
- ``engine.demo.infiniteyou``: the random-weight demo files
"""
import importlib

# The model's names come from ``.model`` (torch) on first use: ``face`` (identity setup checks, which the studio's
# page runs while it is built) must not pull torch into the start-up path.
_MODEL_NAMES = ("INFUSENET_ROLE", "PROJECTOR_ROLE", "IdProjector", "infer_projector_config", "is_id_projector",
                "is_infusenet", "load_infusenet", "load_projector")

MODEL_ID = "ByteDance/InfiniteYou"
PROJECTOR_PATTERN = "infu_flux_v1.0/aes_stage2/image_proj_model.bin"
INFUSENET_PATTERN = "infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors"

__all__ = ["MODEL_ID", "PROJECTOR_PATTERN", "INFUSENET_PATTERN", "PROJECTOR_ROLE", "INFUSENET_ROLE", "IdProjector",
           "infer_projector_config", "is_id_projector", "is_infusenet", "load_infusenet", "load_projector"]


def __getattr__(name):
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
