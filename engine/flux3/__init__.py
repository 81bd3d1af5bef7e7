"""FLUX 3 Image Klein (step-distilled and base): a third model family of the engine.

- ``loading``: the official files (BFL's ``model.safetensors`` or the diffusers ``transformer/`` folder, the
  Qwen3-VL-4B-Instruct text encoder, FLUX.2's 32-channel VAE), architecture from tensor shapes
- ``text``: chat-formatted prompts, the hidden states the DiT reads (4, 8, ..., 32 of Qwen3-VL)
- ``schedule``: the seed's and diffusers' sigma schedules, noise, token layout and position ids
- ``pipeline``: ``Flux3ImagePipeline`` (DiffSynth-Studio's API)
- ``variants``: ModelConfigs for a registry variant
- ``upsampler``: BFL's prompt upsampler (a Qwen3.5 model), run as diffusers' FLUX 3 prompt-upsampler block runs it

Imported lazily (``import engine.flux3`` loads no torch).
"""
_EXPORTS = {"Flux3ImagePipeline": ".pipeline", "load_flux3_models": ".loading", "model_configs": ".variants",
            "is_flux3": ".variants", "PromptUpsampler": ".upsampler", "upsample_prompt": ".upsampler"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine.flux3' has no attribute {name!r}")
