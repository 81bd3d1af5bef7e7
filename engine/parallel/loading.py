"""A registry variant (``engine.registry``) -> its pipeline, loaded whole onto one device: what each torchrun process
of ``engine.parallel.generate`` does. The random-weight demo variants are written into the models folder first."""
from __future__ import annotations

import torch

from .. import registry
from ..errors import EngineError

FLUX1_MODEL_ROLES = ("dit", "vae", "text_encoder_1", "text_encoder_2")


def family(variant) -> str:
    """"flux1", "flux2" or "flux3" for a registry variant."""
    from ..flux2.variants import is_flux2
    from ..flux3.variants import is_flux3
    if is_flux3(variant):
        return "flux3"
    if is_flux2(variant):
        return "flux2"
    return "flux1"


def _write_demo(kind: str, models_dir) -> None:
    from .. import demo
    {"flux1": demo.write_demo_model, "flux2": demo.write_flux2_demo, "flux3": demo.write_flux3_demo}[kind](models_dir)


def _flux1_arguments(variant) -> dict:
    from ..model_config import ModelConfig
    roles = {f.role for f in variant.files}
    if not roles <= set(FLUX1_MODEL_ROLES) | {"tokenizer_1", "tokenizer_2"}:
        raise EngineError(f"{variant.name} needs more than the FLUX.1 text-to-image components "
                          f"({', '.join(sorted(roles - set(FLUX1_MODEL_ROLES)))}); the parallel command runs FLUX.1, "
                          f"FLUX.2 and FLUX 3 text-to-image models.")
    configs = [ModelConfig(model_id=f.model_id, origin_file_pattern=f.pattern) for f in variant.files
               if f.role in FLUX1_MODEL_ROLES]
    tokenizers = {f"{role}_config": ModelConfig(model_id=variant.file(role).model_id,
                                                origin_file_pattern=variant.file(role).pattern)
                  for role in ("tokenizer_1", "tokenizer_2")}
    return {"model_configs": configs, **tokenizers}


def load_variant(name: str, models_dir, device: str, torch_dtype=torch.bfloat16, attention_backend: str = "auto"):
    """The variant's pipeline with every component on ``device`` (no VRAM limit: context parallelism needs the
    transformer resident)."""
    from ..downloads import models_base_path
    variant = registry.get_variant(name)
    kind = family(variant)
    models_dir = models_base_path() if models_dir is None else models_dir
    if variant.demo:
        _write_demo(kind, models_dir)
    common = dict(torch_dtype=torch_dtype, device=device, models_dir=models_dir, attention_backend=attention_backend)
    if kind == "flux3":
        from ..flux3.pipeline import Flux3ImagePipeline
        from ..flux3.variants import model_configs
        return Flux3ImagePipeline.from_pretrained(**model_configs(variant), **common)
    if kind == "flux2":
        from ..flux2.pipeline import Flux2ImagePipeline
        from ..flux2.variants import model_configs
        return Flux2ImagePipeline.from_pretrained(**model_configs(variant), **common)
    from ..pipeline import FluxImagePipeline
    return FluxImagePipeline.from_pretrained(**_flux1_arguments(variant), **common)
