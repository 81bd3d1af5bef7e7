"""DiffSynth-Studio's LoRA Encoder: ``lora_encoder_inputs`` (a LoRA file path or ModelConfig, or a list) and
``lora_encoder_scale`` (1.0), the seed's ``FluxImageUnit_LoRAEncode``.

Each LoRA becomes one token (``engine.lora_encoder``); several are concatenated in order and multiplied by the scale.
The tokens are appended to the POSITIVE prompt only, with zero text ids, and CLIP's pooled vector is left as it is;
the CFG negative pass reads its prompt unchanged. As in the seed's example, the LoRA itself is usually also loaded
on the transformer (``pipe.load_lora``): the token tells the model to show what the LoRA does even without its
trigger words.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .. import latents as lat
from ..errors import EngineError
from .base import Condition, ConditionContext, Text, finite_number


def input_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_scale(value) -> float:
    return finite_number(value, "lora_encoder_scale", "1.0 is the LoRA's token as encoded; 0.5 halves its pull")


class LoRAEncoderCondition(Condition):
    name = "lora_encoder"
    call_args = {"lora_encoder_inputs": None, "lora_encoder_scale": 1.0}

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens                      # (1, LoRAs, D) in the transformer's compute dtype

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["LoRAEncoderCondition"]:
        from ..lora_encoder.encode import encode_loras
        items = input_list(args.get("lora_encoder_inputs"))
        if not items:
            return None
        scale = check_scale(args.get("lora_encoder_scale", 1.0))
        tokens = encode_loras(ctx.pipe, items, scale)
        want = getattr(getattr(getattr(ctx.pipe, "dit", None), "config", None), "joint_attention_dim", None)
        if want is not None and tokens.shape[-1] != want:
            raise EngineError(f"The LoRA Encoder gives {tokens.shape[-1]}-wide tokens but the transformer reads "
                              f"{want}-wide text: this encoder does not belong to this FLUX model.")
        return cls(tokens.to(device=ctx.device, dtype=ctx.dtype))

    @classmethod
    def extra_tokens(cls, args: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
        return len(input_list(args.get("lora_encoder_inputs")))

    def prompt_text(self, text: Optional[Text], step: int, negative: bool) -> Optional[Text]:
        if negative or text is None:
            return text
        ids = torch.cat([text.ids, lat.text_ids(self.tokens.shape[1], device=text.ids.device, dtype=text.ids.dtype)])
        embeds = torch.cat([text.embeds, self.tokens.to(device=text.embeds.device, dtype=text.embeds.dtype)], dim=1)
        return Text(embeds, text.pooled, ids)


__all__ = ["LoRAEncoderCondition", "check_scale", "input_list"]
