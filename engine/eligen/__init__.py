"""EliGen (entity-level control with regional attention, DiffSynth-Studio/Eligen): regional prompts for FLUX.1.

``pipe(prompt, eligen_entity_prompts=[...], eligen_entity_masks=[PIL, ...], eligen_enable_on_negative=False,
eligen_enable_inpaint=False)`` with the EliGen LoRA loaded (``pipe.load_lora(pipe.dit, ModelConfig(
model_id="DiffSynth-Studio/Eligen", origin_file_pattern="model_bf16.safetensors"))``; DiffSynth's own key format,
read by ``engine.lora``). Without the LoRA the attention mask still applies, but FLUX.1 was not trained for it.

- ``masks``: entity masks -> token regions -> the joint attention mask (text first, then image, as diffusers'
  Flux attention concatenates them); the inpainting region.
- ``prompts``: entity prompts encoded like the prompt (T5 at ``t5_sequence_length``) and joined before it.
- The condition the pipeline's loop uses is ``engine.conditions.eligen.EliGenCondition``.
- ``entities`` / ``layout``: checking prompts + masks; saving / reading a layout in DiffSynth's EliGen app folder
  format. These two need no torch (the studio's tabs may import them), so this package imports lazily.
"""
from __future__ import annotations

_EXPORTS = {
    "check_entities": ".entities", "mask_notes": ".entities", "save_layout": ".layout", "load_layout": ".layout",
    "joint_attention_mask": ".masks", "entity_token_regions": ".masks", "inpaint_region": ".masks",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine.eligen' has no attribute {name!r}")
