"""A registry variant of the FLUX.2 family -> the ``from_pretrained`` arguments that load it."""
from __future__ import annotations

from .. import registry


def is_flux2(variant) -> bool:
    """Whether a registry ``Variant`` is a FLUX.2 one (its files name a text_encoder and a tokenizer role, and it is
    no FLUX 3 row, whose files name the same roles)."""
    if variant in registry.FLUX2_VARIANTS:
        return True
    return variant not in registry.FLUX3_VARIANTS and {f.role for f in variant.files} >= {"text_encoder", "tokenizer"}


def model_configs(variant, **vram_fields) -> dict:
    """``{"model_configs": [...], "tokenizer_config": ...}`` for ``Flux2ImagePipeline.from_pretrained(**...)``;
    ``variant`` is a registry ``Variant`` or its name. ``vram_fields`` (the seed's offload_* / computation_*)
    go on every model config."""
    from ..model_config import ModelConfig
    if isinstance(variant, str):
        variant = registry.get_variant(variant)
    if not is_flux2(variant):
        from ..errors import EngineError
        raise EngineError(f"{variant.name} is not a FLUX.2 variant; load it with FluxImagePipeline.")
    configs = [ModelConfig(model_id=f.model_id, origin_file_pattern=f.pattern, **vram_fields)
               for f in variant.files if f.role in ("text_encoder", "dit", "vae")]
    tok = variant.file("tokenizer")
    return {"model_configs": configs, "tokenizer_config": ModelConfig(model_id=tok.model_id,
                                                                      origin_file_pattern=tok.pattern)}
