"""LoRAs merged by learned gates (DiffSynth-Studio's LoRA Fusion, ``engine.lora.fusion``).

Request key: ``lora_fusion`` (true: the job's LoRAs are merged per layer by the gates of
``DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev`` instead of added, the seed's ``pipe.enable_lora_merger()``).
The gates are a small file kept beside the pipeline (``pipe.lora_patcher``, on the CPU; each layer's gate is cast to
the device at its first call); ``configure`` switches them on for a job that asks and off for one that does not. A
demo variant gets the gates' random-weight twin.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from engine.errors import EngineError

from .base import Feature

ADAPTER = "LoRAFusion-preview-FLUX.1-dev"


@dataclasses.dataclass(frozen=True)
class LoraFusionInputs:
    lora_fusion: bool = False


@dataclasses.dataclass
class LoraFusionState:
    count: int               # how many LoRAs the gates merge


class LoraFusionFeature(Feature):
    name = "lora_fusion"
    Inputs = LoraFusionInputs

    def validate(self, inputs: LoraFusionInputs, job) -> Optional[LoraFusionState]:
        if inputs.lora_fusion in (False, None, 0):
            return None
        if not isinstance(inputs.lora_fusion, bool):
            raise EngineError(f"lora_fusion is true or false, got {inputs.lora_fusion!r:.40}.")
        if not job.settings.loras:
            raise EngineError("LoRA Fusion merges the job's LoRAs: choose at least one LoRA (two or more is what it "
                              "is for), or untick 'Merge with LoRA Fusion'.")
        if len(job.settings.loras) == 1:
            job.notes.append("LoRA Fusion with one LoRA: its gate still scales the LoRA per layer; it is made for "
                             "merging two or more.")
        return LoraFusionState(len(job.settings.loras))

    def configure(self, state: Optional[LoraFusionState], job, pipe) -> None:
        if not hasattr(pipe, "enable_lora_merger"):
            return
        if state is None:
            if getattr(pipe, "dit", None) is not None:
                pipe.enable_lora_merger(False)
            return
        files = _files(job)
        if getattr(pipe.lora_patcher, "flux_studio_files", None) != [str(f) for f in files]:
            from engine.loading.lora_fusion import load_lora_fusion
            pipe.lora_patcher = load_lora_fusion(files, torch_dtype=pipe.torch_dtype)
        try:
            pipe.enable_lora_merger()
        except Exception as e:       # LoraError: the gates do not fit this transformer (named by the engine)
            raise EngineError(str(e)) from e

    def recipe(self, state: LoraFusionState, job, copies) -> dict:
        return {"lora_fusion": True}

    def describe(self, recipe: dict) -> list:
        return ["LoRAs merged by LoRA Fusion's learned gates (not added)."] if recipe.get("lora_fusion") else []


def _files(job) -> list:
    """The gate file (downloaded when missing and allowed; the demo's written on first use)."""
    from engine import registry
    from engine.model_config import ModelConfig
    spec = registry.get_adapter(ADAPTER, demo=job.variant.demo).file("lora_patcher")
    if job.variant.demo:
        from engine.demo.lora_fusion import write_lora_fusion_demo
        write_lora_fusion_demo(job.models_dir)
    return ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(job.models_dir)


__all__ = ["LoraFusionFeature", "LoraFusionInputs"]
