"""A registry variant of the FLUX 3 Image Klein family -> the ``from_pretrained`` arguments that load it."""
from __future__ import annotations

from .. import registry


def is_flux3(variant) -> bool:
    """Whether a registry ``Variant`` (or its name) is a FLUX 3 one."""
    if isinstance(variant, str):
        return any(v.name == variant or v.label == variant for v in registry.FLUX3_VARIANTS)
    return variant in registry.FLUX3_VARIANTS


def model_configs(variant, **vram_fields) -> dict:
    """``{"model_configs": [...], "tokenizer_config": ...}`` for ``Flux3ImagePipeline.from_pretrained(**...)``;
    ``variant`` is a registry ``Variant`` or its name. ``vram_fields`` (the seed's offload_* / computation_*)
    go on every model config."""
    from ..model_config import ModelConfig
    if isinstance(variant, str):
        variant = registry.get_variant(variant)
    if not is_flux3(variant):
        from ..errors import EngineError
        raise EngineError(f"{variant.name} is not a FLUX 3 variant; load it with its own pipeline "
                          f"(FluxImagePipeline for FLUX.1, Flux2ImagePipeline for FLUX.2).")
    configs = [ModelConfig(model_id=f.model_id, origin_file_pattern=f.pattern, **vram_fields)
               for f in variant.files if f.role in ("text_encoder", "dit", "vae")]
    tok = variant.file("tokenizer")
    return {"model_configs": configs, "tokenizer_config": ModelConfig(model_id=tok.model_id,
                                                                      origin_file_pattern=tok.pattern)}


def is_base(variant) -> bool:
    """Whether a FLUX 3 variant runs the base transformer (no ``ref_time_in``): the one LoRAs train on."""
    return variant.file("dit").model_id in (registry.FLUX3_BASE, registry.FLUX3_BASE_DEMO_ID)
