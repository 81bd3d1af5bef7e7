"""FLUX Studio's engine: everything that touches tensors; the studio (``studio``) and scripts use it.

Public API (imported lazily, so ``import engine`` does not load torch):
    FluxImagePipeline, ModelConfig          the seed-compatible pipeline and its file configs
    ControlNetInput                         the seed's ControlNet input (``pipe(controlnet_inputs=[...])``)
    EngineError, JobCancelled, ModelNotFoundError
"""
_EXPORTS = {
    "FluxImagePipeline": ".pipeline",
    "Flux2ImagePipeline": ".flux2.pipeline",
    "Flux3ImagePipeline": ".flux3.pipeline",
    "ModelConfig": ".model_config",
    "ControlNetInput": ".controlnet.inputs",
    "EngineError": ".errors",
    "JobCancelled": ".errors",
    "ModelNotFoundError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
