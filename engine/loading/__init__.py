"""Reading the official FLUX.1 checkpoint files exactly.

- ``files``: safetensors headers, shard sets and their index, memory-mapped reading, a clear error per bad file
- ``detect``: which component a state dict is (from its keys) and in which layout
- ``transformer``: BFL / diffusers transformer, architecture from shapes, the BFL -> diffusers key mapping
- ``vae``: BFL ``ae.safetensors`` / diffusers ``vae/`` onto ``AutoencoderKL``
- ``text_encoders``: CLIP-L and T5-XXL encoder onto transformers' classes
- ``load``: ``load_models`` tying it together

The architecture is always inferred from tensor shapes, so a small random checkpoint in an official layout loads
through exactly the code the 24 GB file does. See each module's docstring for the rules (the rotary-axis rule for
non-128 head widths is in ``transformer``).
"""
from .detect import detect_component
from .errors import ROLE_NAMES, ROLES, ModelFileError
from .files import read_header, read_state_dict, resolve_groups
from .load import load_models
from .text_encoders import convert_clip, convert_t5, infer_clip_config, infer_t5_config
from .transformer import build_transformer, convert_bfl_transformer, infer_transformer_config, rope_axes
from .vae import build_vae, convert_bfl_vae, infer_vae_config

__all__ = [
    "load_models", "detect_component", "ModelFileError", "read_state_dict", "infer_transformer_config",
    "convert_bfl_transformer", "infer_vae_config", "convert_bfl_vae", "build_transformer", "build_vae",
    "read_header", "resolve_groups", "infer_clip_config", "convert_clip", "infer_t5_config", "convert_t5",
    "rope_axes", "ROLES", "ROLE_NAMES",
]
