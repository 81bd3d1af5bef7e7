"""LoRAs encoded as prompt tokens (DiffSynth-Studio's LoRA Encoder, ``engine.conditions.lora_encoder``).

Request keys: ``lora_encode`` (names among the job's ``loras``: each becomes one token after the prompt, which pulls
the image towards what the LoRA does even without its trigger words; ``true`` = all of them) and
``lora_encoder_scale`` (the tokens' weight, 1 as encoded). As in the seed's example the LoRAs stay on the
transformer too (the picker's weights). The encoder (``DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev``) fills the
``lora_encoder`` slot; a demo variant gets its random-weight twin. The encoder reads every linear layer of the
transformer, so a LoRA that leaves layers out is refused by the engine with the layers it lacks.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from engine.errors import EngineError

from .base import Feature, adapter_models, number_in, own_prompt

ADAPTER = "LoRA-Encoder-FLUX.1-Dev"
MAX_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class LoraEncoderInputs:
    """The request keys (as sent)."""

    lora_encode: tuple = dataclasses.field(default=(), metadata={"kinds": (list, tuple, bool)})
    lora_encoder_scale: float = 1.0


@dataclasses.dataclass
class LoraEncoderState:
    names: list              # LoRA names (in the LoRA folder), in the job's order
    scale: float


def encoded_names(value, chosen: list) -> list:
    """The LoRAs to encode: ``True`` = every chosen one; a list = those names (each must be chosen)."""
    if value is True:
        return list(chosen)
    if value in (False, None):
        return []
    names = [str(v) for v in value]
    missing = [n for n in names if n not in chosen]
    if missing:
        raise EngineError(f"LoRA {', '.join(missing)} is marked 'encode as prompt' but is not among the job's LoRAs: "
                          f"choose it in the LoRA picker too (the encoder reads the LoRA the transformer uses).")
    return [n for n in chosen if n in names]


class LoraEncoderFeature(Feature):
    name = "lora_encoder"
    Inputs = LoraEncoderInputs
    roles = ("lora_encoder",)

    def validate(self, inputs: LoraEncoderInputs, job) -> Optional[LoraEncoderState]:
        names = encoded_names(inputs.lora_encode, [item["name"] for item in job.settings.loras])
        if not names:
            return None
        if own_prompt(job.variant):
            raise EngineError(f"{job.variant.name} writes its own prompt tokens, so a LoRA cannot be added to them as "
                              f"a token (LoRA Encoder). Untick 'Encode as prompt', or choose a FLUX.1 model.")
        scale = number_in(inputs.lora_encoder_scale, 0.0, MAX_SCALE, "The LoRA Encoder's scale must be a number "
                          f"from 0 to {MAX_SCALE:g} (1 = the token as encoded), got {{value}}.")
        return LoraEncoderState(names, scale)

    def pipe_kwargs(self, state: LoraEncoderState, job, notes: list) -> dict:
        from engine.lora import library
        paths = [str(library.resolve(job.models_dir, name)) for name in state.names]
        return {"lora_encoder_inputs": paths, "lora_encoder_scale": state.scale}

    def extra_models(self, state: LoraEncoderState, job) -> list:
        from engine.demo.lora_encoder import write_lora_encoder_demo
        return adapter_models(ADAPTER, job.variant.demo, {"lora_encoder": "model"}, _load, write_lora_encoder_demo)

    def recipe(self, state: LoraEncoderState, job, copies) -> dict:
        return {"lora_encode": list(state.names), "lora_encoder_scale": state.scale}

    def describe(self, recipe: dict) -> list:
        names = recipe.get("lora_encode")
        if not names or names is True:
            return []
        return [f"LoRAs encoded as prompt tokens (LoRA Encoder), scale {recipe.get('lora_encoder_scale', 1.0)}: "
                f"{', '.join(map(str, names))}"]


def _load(role: str):
    def load(files, torch_dtype):
        from engine.loading.errors import ModelFileError
        from engine.lora_encoder.load import load_role
        try:
            return load_role(role, files, torch_dtype, "cpu")
        except ModelFileError as e:
            raise EngineError(f"The LoRA Encoder could not be loaded: {e}") from e
    return load


__all__ = ["LoraEncoderFeature", "LoraEncoderInputs", "encoded_names"]
