"""DiffSynth-Studio's LoRA Encoder (``DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev``): a LoRA's weights become one prompt
token, appended to the positive prompt (``engine.conditions.lora_encoder``).

- ``model``: the module in the official key layout, its math, architecture from tensor shapes
- ``load``: the file among ``from_pretrained``'s (``claims``), loaded one to one
- ``encode``: LoRA files (any format ``engine.lora`` reads) -> tokens; the missing-layers message
"""
from .model import ROLE, FluxLoRAEncoder, infer_config, is_lora_encoder

__all__ = ["ROLE", "FluxLoRAEncoder", "infer_config", "is_lora_encoder"]
