"""InstantX's FLUX.1 IP-Adapter: ``ipadapter_images`` (one PIL image or a list) and ``ipadapter_scale`` (1.0, the
seed's default: DiffSynth-Studio's ``FluxImagePipeline.__call__``; its example passes 0.7).

Prepared once per image (``engine.ipadapter.encode``): SigLIP's pooled vector of each reference image, the image
projection's 128 tokens per image (several images: one sequence of N x 128 tokens), and every block's keys and
values. The hook is ``attention_kwargs``: it gives them to the transformer as ``joint_attention_kwargs["ipadapter"]``
and the processor ``engine.ipadapter.attention`` installs on the transformer adds the IP term in all 57 blocks
(inert in calls that give none). EliGen's ``attention_mask`` travels beside it unchanged.

The CFG negative pass (``cfg_scale`` != 1), as the seed: the IP term of an all-zero SigLIP vector, at scale 1.0
(DiffSynth-Studio calls ``pipe.ipadapter(zeros_like(encoding))`` without the scale).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..ipadapter import attention
from ..ipadapter.encode import check_loaded, check_transformer, keys_values, pooled
from .base import Condition, ConditionContext, StepState, finite_number, pil_images

MAX_SCALE = 2.0          # the studio's range (the engine takes any number, as the seed)


def image_list(value) -> list:
    """One image or a list of images -> list of PIL images (``conditions.base.pil_images``)."""
    return pil_images(value, "ipadapter_images")


def check_scale(value) -> float:
    """Any finite number, as the seed takes it (the studio keeps it from 0 to ``MAX_SCALE``)."""
    return finite_number(value, "ipadapter_scale", "1 is the adapter as trained; 0.7 is the seed's example")


class IPAdapterCondition(Condition):
    name = "ipadapter"
    call_args = {"ipadapter_images": None, "ipadapter_scale": 1.0}

    def __init__(self, positive: attention.IPAdapterKV, negative: Optional[attention.IPAdapterKV]):
        self.positive, self.negative = positive, negative

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["IPAdapterCondition"]:
        images = image_list(args.get("ipadapter_images"))
        if not images:
            return None
        scale = check_scale(args.get("ipadapter_scale", 1.0))
        pipe = ctx.pipe
        check_loaded(pipe)
        heads, _ = check_transformer(pipe)
        vectors = pooled(pipe, images)
        ks, vs = keys_values(pipe, vectors, heads, ctx.device, ctx.dtype)
        negative = None
        if ctx.cfg_scale != 1.0:
            nk, nv = keys_values(pipe, torch.zeros_like(vectors), heads, ctx.device, ctx.dtype)
            negative = attention.IPAdapterKV(nk, nv, 1.0)
        attention.install(pipe.dit)
        return cls(attention.IPAdapterKV(ks, vs, scale), negative)

    def attention_kwargs(self, state: StepState) -> dict:
        kv = self.negative if state.negative else self.positive
        return {attention.KWARG: kv} if kv is not None else {}


__all__ = ["IPAdapterCondition", "check_scale", "image_list", "MAX_SCALE"]
