"""The FLUX.2 family ([klein] 4B / 9B, their base models, [dev]): a second model family of the engine.

- ``loading``: the official files (diffusers transformer folder or BFL single file, the 32-channel VAE, Qwen3 /
  Mistral Small text encoders), architecture from tensor shapes
- ``text``: chat-formatted prompts, the hidden states the DiT reads (klein 9/18/27, [dev] 10/20/30)
- ``schedule``: the seed's and diffusers' sigma schedules, noise, token layout and position ids
- ``pipeline``: ``Flux2ImagePipeline`` (DiffSynth-Studio's API)
- ``variants``: ModelConfigs for a registry variant

Imported lazily (``import engine.flux2`` loads no torch).
"""
_EXPORTS = {"Flux2ImagePipeline": ".pipeline", "load_flux2_models": ".loading", "model_configs": ".variants"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine.flux2' has no attribute {name!r}")
