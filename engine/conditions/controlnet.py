"""``controlnet_inputs=[ControlNetInput(...)]``: ControlNet residuals added to the transformer's blocks.

Prepared once per image (``controlnet_condition``): each input's control image is resized to the output size,
VAE-encoded (the posterior's mean, as every image here) and packed into tokens, as diffusers' FluxControlNetPipeline
does for FLUX ControlNets. The alimama Inpainting ControlNet (68 control features) gets the seed's inpainting input:
the image with the masked pixels set to black, encoded, then the mask (1 = keep) at latent size as a 17th channel,
packed (64 + 4 features per token). The Union ControlNet gets its mode from ``processor_id``.

At each step (``dit_kwargs``) every input whose [end, start] window holds the step's progress runs its ControlNet on
the current latent tokens with the pass's text embeddings (the CFG negative pass gets its own residuals, as the seed
computes them), its residuals are scaled, and the inputs' residuals are summed. ControlNets with fewer blocks than
the transformer spread their residuals as diffusers' transformer does (residual ``i // ceil(blocks / n)`` at block
``i``); residual lists of different lengths are spread to the transformer's depth before they are summed, which is
what the seed does (diffusers' FluxMultiControlNetModel would truncate to the shorter). An input with scale 0 is not
run (it would add zeros).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import latents as lat
from ..controlnet.inputs import ControlNetInput
from ..controlnet.load import check_compatible
from ..controlnet.modes import union_mode
from ..errors import EngineError
from .base import Condition, ConditionContext, StepState

# The seed's default embedded guidance: given to a ControlNet with a guidance embedder when the transformer has none
# (schnell), since the loop then makes no guidance value.
DEFAULT_GUIDANCE = 3.5


@dataclass
class PreparedInput:
    spec: ControlNetInput
    index: int                       # which of the pipeline's ControlNets
    cond: torch.Tensor               # (1, N, 64 or 68) packed control features, float32
    mode: Optional[int] = None       # Union mode row


def _as_image(value, what: str) -> Image.Image:
    if isinstance(value, (str, os.PathLike)):
        value = Image.open(value)
    if not isinstance(value, Image.Image):
        raise EngineError(f"{what} must be a PIL image (got {type(value).__name__}).")
    return value.convert("RGB")


def _fit(image: Image.Image, width: int, height: int, resample=Image.LANCZOS) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample)


def inpaint_features(ctx: ConditionContext, image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """The alimama ControlNet's (1, N, 68) input, as the seed builds it: masked pixels (mask > mid-grey, averaged over
    channels) set to black, encoded; the mask in [0, 1] brought to latent size (nearest), inverted (1 = keep),
    appended as a 17th latent channel, packed."""
    mask = mask.convert("RGB")
    if mask.size != image.size:
        mask = mask.resize(image.size)
    m = np.asarray(mask, dtype=np.float32).mean(axis=2) / 127.5 - 1.0          # [-1, 1], as the seed's preprocessing
    pixels = np.array(image)
    pixels[m > 0] = 0
    latents = ctx.encode_image(Image.fromarray(pixels)).float()
    keep = torch.from_numpy((m + 1.0) / 2.0)[None, None].to(latents.device)
    keep = 1.0 - F.interpolate(keep, size=latents.shape[-2:])
    return lat.pack(torch.cat([latents, keep], dim=1))


def prepare(ctx: ConditionContext, spec: ControlNetInput, number: int) -> PreparedInput:
    """One input's control features for this image (checked against its ControlNet)."""
    multi = ctx.pipe.controlnet
    net = multi.net(spec.controlnet_id)
    what = f"controlnet_inputs[{number}] (ControlNet {spec.controlnet_id})"
    in_ch, cond_ch = net.config.in_channels, net.controlnet_x_embedder.in_features
    source = spec.inpaint_image if spec.inpaint_image is not None else spec.image
    if source is None:
        raise EngineError(f"{what} has no image: set image=... (the control image).")
    image = _fit(_as_image(source, f"{what}.image"), ctx.width, ctx.height)
    if cond_ch == in_ch + 4:
        if spec.inpaint_mask is None:
            raise EngineError(f"{what} is the Inpainting ControlNet: it needs inpaint_mask=... (white = repaint) "
                              f"beside the image.")
        cond = inpaint_features(ctx, image, _as_image(spec.inpaint_mask, f"{what}.inpaint_mask"))
    else:
        if spec.inpaint_mask is not None:
            raise EngineError(f"{what}: inpaint_mask is for the Inpainting ControlNet (image + mask input); this "
                              f"ControlNet takes a control image only.")
        cond = lat.pack(ctx.encode_image(image).float())
    mode = None
    if net.union:
        mode = union_mode(spec.processor_id, net.config.num_mode, f"{what}, the Union ControlNet,")
    return PreparedInput(spec=spec, index=int(spec.controlnet_id), cond=cond, mode=mode)


def spread(residuals: list, depth: int) -> list:
    """``residuals`` over ``depth`` transformer blocks as diffusers' transformer indexes them."""
    interval = math.ceil(depth / len(residuals))
    return [residuals[b // interval] for b in range(depth)]


def combine(lists: list, depth: int) -> Optional[list]:
    """Sum several ControlNets' residual lists for blocks of ``depth``; None when none has any."""
    present = [r for r in lists if r]
    if not present:
        return None
    if len({len(r) for r in present}) > 1:          # different lengths: same block, same residual, then sum
        present = [spread(r, depth) for r in present]
    out = list(present[0])
    for r in present[1:]:
        out = [a + b for a, b in zip(out, r)]
    return out


class ControlNetCondition(Condition):
    """``pipe(controlnet_inputs=[ControlNetInput(...)])``: the active inputs' residuals at every step."""

    name = "controlnet"
    call_args = {"controlnet_inputs": None}

    def __init__(self, ctx: ConditionContext, prepared: list):
        self.pipe = ctx.pipe
        self.prepared = prepared
        self.steps = ctx.steps
        self.device, self.dtype = ctx.device, ctx.dtype
        dit = ctx.pipe.dit
        self.depths = (len(dit.transformer_blocks), len(dit.single_transformer_blocks))

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> "ControlNetCondition":
        return controlnet_condition(ctx, args["controlnet_inputs"])

    def active(self, step: int) -> list:
        return [p for p in self.prepared if p.spec.scale != 0 and p.spec.active(step, self.steps)]

    def dit_kwargs(self, state: StepState) -> dict:
        active = self.active(state.step)
        if not active:
            return {}
        place = self.pipe.placements["controlnet"]
        dev, dt = place.compute_device, place.compute_dtype
        latents, text = state.latents, state.text

        def run(multi):
            out = []
            for p in active:
                net = multi.nets[p.index]
                g = None
                if net.config.guidance_embeds:
                    g = state.guidance if state.guidance is not None else \
                        torch.full((latents.shape[0],), DEFAULT_GUIDANCE)
                    g = g.to(device=dev, dtype=torch.float32)
                mode = None if p.mode is None else torch.full((latents.shape[0], 1), p.mode, dtype=torch.long,
                                                              device=dev)
                out.append(net(hidden_states=latents.to(device=dev, dtype=dt),
                               controlnet_cond=p.cond.to(device=dev, dtype=dt), controlnet_mode=mode,
                               conditioning_scale=float(p.spec.scale),
                               encoder_hidden_states=text.embeds.to(device=dev, dtype=dt),
                               pooled_projections=text.pooled.to(device=dev, dtype=dt),
                               timestep=state.timestep.to(device=dev, dtype=dt), img_ids=state.latent_ids.to(dev),
                               txt_ids=text.ids.to(dev), guidance=g, return_dict=False))
            return out

        outs = self.pipe.run_model("controlnet", self.pipe.controlnet, run)
        # Image tokens of other conditions (Kontext's references) after the image's: no residual
        extra = state.hidden_states.shape[1] - latents.shape[1]

        def finish(res, depth):
            if res is None:
                return None
            res = [r.to(device=self.device, dtype=self.dtype) for r in res]
            if extra > 0:
                res = [F.pad(r, (0, 0, 0, extra)) for r in res]
            # one per transformer block (as diffusers indexes them), so InfuseNet's residuals of another count add up
            return spread(res, depth)

        return {"controlnet_block_samples": finish(combine([o[0] for o in outs], self.depths[0]), self.depths[0]),
                "controlnet_single_block_samples": finish(combine([o[1] for o in outs], self.depths[1]),
                                                          self.depths[1])}


def controlnet_condition(ctx: ConditionContext, controlnet_inputs) -> ControlNetCondition:
    """The condition for the seed's ``controlnet_inputs`` (a ControlNetInput, or a list of them / of their fields as
    dicts), with every control image prepared."""
    multi = getattr(ctx.pipe, "controlnet", None)
    if multi is None and getattr(ctx.pipe, "infinityou_infusenet", None) is not None:
        raise EngineError("controlnet_inputs were given, but the only ControlNet loaded is InfiniteYou's InfuseNet, which "
                          "runs by itself from infinityou_id_image with its black control image (what the seed's "
                          "example passes as controlnet_inputs): drop controlnet_inputs, or load a ControlNet for them.")
    if multi is None:
        raise EngineError("controlnet_inputs were given but no ControlNet is loaded: add the ControlNet's ModelConfig "
                          "to from_pretrained, e.g. ModelConfig(model_id=\"InstantX/FLUX.1-dev-Controlnet-Union-alpha\", "
                          "origin_file_pattern=\"diffusion_pytorch_model.safetensors\").")
    check_compatible(multi, ctx.pipe.dit)
    if isinstance(controlnet_inputs, (ControlNetInput, dict)):
        controlnet_inputs = [controlnet_inputs]
    specs = []
    for i, spec in enumerate(controlnet_inputs):
        if isinstance(spec, dict):
            spec = ControlNetInput(**spec)
        elif not isinstance(spec, ControlNetInput) and all(hasattr(spec, f) for f in ("controlnet_id", "image")):
            # another library's ControlNetInput (e.g. DiffSynth's): same fields
            spec = ControlNetInput(**{f: getattr(spec, f) for f in ControlNetInput.__dataclass_fields__
                                      if hasattr(spec, f)})
        if not isinstance(spec, ControlNetInput):
            raise EngineError(f"controlnet_inputs[{i}] is a {type(spec).__name__}, not a ControlNetInput.")
        specs.append(spec)
    prepared = [prepare(ctx, spec, i) for i, spec in enumerate(specs)]
    return ControlNetCondition(ctx, prepared)
