"""BFL's prompt upsampler for FLUX 3 Image Klein (``engine.flux3.upsampler``, the model card's advice): the prompt
-- or, for an edit, the instruction read with the reference images -- is expanded into the detailed caption FLUX 3
was trained on, before the job runs.

Request key: ``upsample_prompt`` (true / false). The upsampler (``black-forest-labs/flux-3-image-klein-pup``, a
Qwen3.5 model of about 19 GB; a demo variant uses its random-weight twin) is loaded for the job on the pipeline's
device after the FLUX 3 components have moved out of the way, run greedily, and released; the caption replaces the
prompt the pipeline reads. The recipe keeps the prompt as written, the option, and the caption; the image info
shows the caption. Not planned by the VRAM planner (it runs alone, before the denoising).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from engine.errors import EngineError

from .base import Feature

DEMO_TOKENS = 48            # the random-weight demo writes gibberish: a short caption keeps it quick


@dataclasses.dataclass(frozen=True)
class PromptUpsamplerInputs:
    upsample_prompt: bool = False


@dataclasses.dataclass
class PromptUpsamplerState:
    caption: Optional[str] = None          # set before the job (``configure``)


class PromptUpsamplerFeature(Feature):
    name = "prompt_upsampler"
    Inputs = PromptUpsamplerInputs

    def validate(self, inputs: PromptUpsamplerInputs, job) -> Optional[PromptUpsamplerState]:
        if inputs.upsample_prompt in (False, None, 0):
            return None
        if not isinstance(inputs.upsample_prompt, bool):
            raise EngineError(f"upsample_prompt is true or false, got {inputs.upsample_prompt!r:.40}.")
        from ..families import family_of
        if family_of(job.variant).name != "FLUX 3":
            raise EngineError(f"BFL's prompt upsampler is FLUX 3 Image Klein's; {job.variant.label} reads the prompt "
                              f"as written. Untick 'Upsample the prompt', or choose a FLUX 3 model.")
        if not job.settings.prompt.strip():
            raise EngineError("The prompt upsampler expands a prompt: write one, or untick 'Upsample the prompt'.")
        return PromptUpsamplerState()

    def configure(self, state: Optional[PromptUpsamplerState], job, pipe) -> None:
        if state is None or state.caption is not None:
            return
        from engine.flux3.upsampler import PromptUpsampler
        if not job.variant.demo:
            _fetch(job.models_dir)                 # downloaded when missing and allowed; else the files are named
        residency = getattr(pipe, "residency", None)
        if residency is not None:
            residency.offload_all()                # the FLUX 3 components make room for it
        upsampler = PromptUpsampler.from_models_dir(job.models_dir, demo=job.variant.demo, device=str(pipe.device))
        try:
            edit = job.states.get("edit")
            refs = [r.image for refs in (edit.references.values() if edit else ()) for r in refs]
            extra = {"max_new_tokens": DEMO_TOKENS} if job.variant.demo else {}
            state.caption = upsampler.upsample(job.settings.prompt, references=refs or None, width=job.width,
                                               height=job.height, **extra)
        finally:
            upsampler.release()

    def pipe_kwargs(self, state: PromptUpsamplerState, job, notes: list) -> dict:
        return {"prompt": state.caption} if state.caption else {}

    def recipe(self, state: PromptUpsamplerState, job, copies) -> dict:
        return {"upsample_prompt": True, "upsampled_prompt": state.caption or ""}

    def describe(self, recipe: dict) -> list:
        if not recipe.get("upsample_prompt"):
            return []
        return ["Prompt upsampled (BFL's FLUX 3 prompt upsampler); the model read:",
                f"  {recipe.get('upsampled_prompt') or '?'}"]


def _fetch(models_dir) -> None:
    """The upsampler's files in the models folder (``ModelConfig`` downloads them when allowed)."""
    from engine import registry
    from engine.model_config import ModelConfig
    for spec in registry.get_adapter("FLUX.3-Image-Klein-pup").files:
        ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(models_dir)


__all__ = ["PromptUpsamplerFeature", "PromptUpsamplerInputs"]
