"""Extra inputs of the denoising loop (the seed's ``pipe(...)`` arguments beyond the prompt), one ``Condition``
subclass each (the interface and its hooks: ``base.py``):

- ``controlnet``: ``controlnet_inputs=[ControlNetInput(...)]``: residuals added to the transformer's blocks.
- ``fill``: ``flux_fill_image`` / ``flux_fill_mask``: FLUX.1-Fill's masked-image and mask features.
- ``flex``: ``flex_inpaint_image`` / ``flex_inpaint_mask`` / ``flex_control_image`` / ``flex_control_strength`` /
  ``flex_control_stop``: Flex.2's features.
- ``kontext``: ``kontext_images``: reference images as extra tokens in the sequence (FLUX.1 Kontext).
- ``step1x``: ``step1x_reference_image``: Step1X-Edit's Qwen2.5-VL text and reference tokens.
- ``nexus_gen``: ``nexus_gen_reference_image``: Nexus-GenV2's AR target embeddings as the positive prompt
  (generation whenever its AR model is loaded; editing with the reference image).
- ``redux``: ``flux_redux_image`` / ``flux_redux_strength`` / ``flux_redux_keep_prompt``: FLUX.1-Redux's image
  prompt (SigLIP tokens in the text).
- ``lora_encoder``: ``lora_encoder_inputs`` / ``lora_encoder_scale``: DiffSynth-Studio's LoRA Encoder (one token per
  LoRA after the positive prompt).
- ``ipadapter``: ``ipadapter_images`` / ``ipadapter_scale``: InstantX's IP-Adapter (extra keys and values in every
  attention block).
- ``infiniteyou``: ``infinityou_id_image`` / ``infinityou_guidance``: ByteDance InfiniteYou's identity (InfuseNet's
  residuals from the face embedding's tokens).
- ``eligen``: ``eligen_entity_prompts`` / ``eligen_entity_masks`` / ``eligen_enable_on_negative`` /
  ``eligen_enable_inpaint``: EliGen's regional prompts.

``CONDITIONS`` is the order their hooks run in. ``build_conditions`` prepares the ones a ``pipe(...)`` call asks
for; ``call_arguments`` lists every argument they read; ``sequence_tokens`` estimates the transformer's sequence
beside the image for the memory planner.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from ..errors import EngineError
from .base import (Condition, ConditionContext, ImageTokens, StepState, Text, in_channels, merge_attention_kwargs,
                   merge_dit_kwargs)
from .controlnet import ControlNetCondition
from .eligen import EliGenCondition
from .fill import FillCondition
from .flex import FlexCondition
from .ipadapter import IPAdapterCondition
from .infiniteyou import InfiniteYouCondition
from .kontext import KontextCondition
from .lora_encoder import LoRAEncoderCondition
from .nexus_gen import NexusGenCondition
from .redux import ReduxCondition
from .step1x import Step1XCondition

# Hook order. One line per condition; a new one goes in its place here (prompt-text makers before EliGen, which
# joins its entity prompts to the text they leave).
CONDITIONS: tuple = (
    ControlNetCondition,
    FillCondition,
    FlexCondition,
    KontextCondition,
    Step1XCondition,
    NexusGenCondition,
    ReduxCondition,
    LoRAEncoderCondition,
    IPAdapterCondition,
    InfiniteYouCondition,
    EliGenCondition,
)


def call_arguments() -> dict:
    """name -> default of every ``pipe(...)`` argument a condition reads."""
    out: dict = {}
    for cls in CONDITIONS:
        out.update(cls.call_args)
    return out


def check_arguments(inputs: Mapping, also: Iterable[str] = ()) -> None:
    """Refuse an argument no condition declares (and not in ``also``, the pipeline's own), naming the known ones."""
    known = call_arguments()
    unknown = [name for name in inputs if name not in known and name not in also]
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise EngineError(f"pipe() got unknown argument{'s' if len(unknown) > 1 else ''} {names}. It takes "
                          f"{', '.join(also) + ', ' if also else ''}and the condition inputs "
                          f"{', '.join(known)}.")


def _arguments(cls, inputs: Mapping) -> dict:
    return {name: inputs.get(name, default) for name, default in cls.call_args.items()}


def build_conditions(ctx: ConditionContext, inputs: Mapping) -> list:
    """The conditions one ``pipe(...)`` call asks for (``inputs``: its condition arguments), prepared for ``ctx``,
    in ``CONDITIONS`` order."""
    check_arguments(inputs)
    out = []
    for cls in CONDITIONS:
        args = _arguments(cls, inputs)
        if cls.requested(args, ctx.pipe):
            condition = cls.prepare(ctx, args)
            if condition is not None:
                out.append(condition)
    return out


def sequence_tokens(inputs: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
    """Tokens the transformer sees beside the output image's for a call with these condition arguments: the
    prompt's T5 tokens (none when a condition makes the text itself: Step1X's Qwen tokens stand in their place)
    plus every requested condition's ``extra_tokens``. Estimated without models (Fill and Flex, asked for by the
    loaded transformer, add no tokens)."""
    requested = [(cls, _arguments(cls, inputs)) for cls in CONDITIONS]
    requested = [(cls, args) for cls, args in requested if cls.requested(args, None)]
    text = 0 if any(cls.replaces_prompt for cls, _ in requested) else int(t5_sequence_length)
    return text + sum(cls.extra_tokens(args, width, height, int(t5_sequence_length)) for cls, args in requested)


__all__ = ["CONDITIONS", "Condition", "ConditionContext", "ImageTokens", "StepState", "Text", "build_conditions",
           "call_arguments", "check_arguments", "in_channels", "merge_attention_kwargs", "merge_dit_kwargs",
           "sequence_tokens"]
