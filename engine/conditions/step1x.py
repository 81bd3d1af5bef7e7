"""Step1X-Edit: ``pipe(step1x_reference_image=...)``, sampled as the model authors do it (``inference.py``).

- The reference image is resized to the output size (the authors derive the output size from the reference and
  assert they are equal; here the requested size wins and the reference is resized to it), VAE-encoded, packed,
  and its tokens appended after the generated image's tokens (``image_tokens``). Its position ids are the generated
  image's own: index 0, the same rows and columns (authors' ``ref_img_ids``; DiffSynth's seed does the same).
- Qwen2.5-VL sees that same resized reference with the instruction (and, for CFG, with the negative prompt); the
  connector turns its 640 hidden states into text tokens and the pooled vector for every step, conditioned on the
  step's sigma (``prompt_text``). All steps are computed before denoising: the result is the same, and the
  connector's stage is separate from the DiT's, so an offloaded connector is not swapped with the DiT at every
  step. Text position ids are zero. The DiT attends to all 640 text tokens (the mask only enters the connector), as
  in the authors' code. CLIP and T5 do not run (``replaces_prompt``).
- The DiT has no guidance embedder, so the loop gives it no embedded guidance (None), as the authors do.
- True CFG: ``v = v_neg + cfg * (v_pos - v_neg)`` (the authors' norm-rescaled branch only applies for
  t > ``timesteps_truncate`` = 1.0, i.e. never). Only the generated tokens are stepped; the reference tokens stay
  clean and are dropped before decoding.

Deviations of DiffSynth-Studio (the seed) from the authors, where we follow the authors: the seed gives Qwen and
the VAE the reference as uploaded (not resized to the output size), so a reference of another size than the output
gets other Qwen tokens and breaks the seed's ``[:, :n // 2]`` split of generated and reference tokens.
"""
from __future__ import annotations

from typing import Mapping

import torch
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from ..step1x.encoder import MAX_LENGTH, Step1XEncoder
from .base import Condition, ConditionContext, ImageTokens, Text


def qwen_encoder(pipe) -> Step1XEncoder:
    """The authors' Qwen2.5-VL embedder on the pipeline's Qwen model (cheap to make: it holds a few token ids)."""
    if getattr(pipe, "qwen_vl", None) is None or getattr(pipe, "step1x_connector", None) is None:
        raise EngineError("Step1X-Edit needs its Qwen2.5-VL encoder (Qwen/Qwen2.5-VL-7B-Instruct folder) and the "
                          "step1x-edit-i1258.safetensors file (DiT + connector): add their ModelConfigs.")
    processor = getattr(pipe.qwen_vl, "flux_studio_processor", None)
    if processor is None:
        raise EngineError("The Qwen2.5-VL processor is not loaded: the Qwen2.5-VL folder needs its tokenizer, "
                          "preprocessor_config.json and chat template.")
    return Step1XEncoder(pipe.qwen_vl, processor)


def compute_place(pipe, role: str):
    """(device, dtype) where the component computes."""
    place = pipe.placements.get(role)
    if place is not None:
        return place.compute_device, place.compute_dtype
    p = next(getattr(pipe, role).parameters())
    return p.device, p.dtype


class Step1XCondition(Condition):
    name = "step1x"
    call_args = {"step1x_reference_image": None}
    replaces_prompt = True

    def __init__(self, texts: dict, reference: ImageTokens):
        self.texts = texts              # {negative: [Text of step 0, 1, ...]}
        self.reference = reference

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> "Step1XCondition":
        image = args["step1x_reference_image"]
        if not isinstance(image, Image.Image):
            raise EngineError("step1x_reference_image must be a PIL image.")
        encoder = qwen_encoder(ctx.pipe)
        reference = image.convert("RGB")
        if reference.size != (ctx.width, ctx.height):
            reference = reference.resize((ctx.width, ctx.height), Image.LANCZOS)
        prompts = {False: ctx.prompt}
        if ctx.cfg_scale != 1.0:
            prompts[True] = ctx.negative_prompt
        hidden = {neg: qwen_hidden(ctx, encoder, text, reference) for neg, text in prompts.items()}
        texts = {neg: connector_texts(ctx, *h) for neg, h in hidden.items()}
        tokens = lat.pack(ctx.encode_image(reference)).float()
        return cls(texts, ImageTokens(tokens, lat.image_ids(ctx.height, ctx.width, device=ctx.device)))

    @classmethod
    def extra_tokens(cls, args: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
        # Qwen's 640 tokens stand in T5's place; the reference is resized to the output (tokens of 16 pixels).
        return MAX_LENGTH + (-(-width // lat.TOKEN_FACTOR)) * (-(-height // lat.TOKEN_FACTOR))

    def prompt_text(self, text, step: int, negative: bool) -> Text:
        return self.texts[negative][step]

    def image_tokens(self) -> ImageTokens:
        return self.reference


def qwen_hidden(ctx: ConditionContext, encoder: Step1XEncoder, prompt: str, reference: Image.Image):
    """Qwen2.5-VL's (1, 640, D) hidden states and (1, 640) mask for the instruction and the reference."""
    pipe = ctx.pipe
    qdev, _ = compute_place(pipe, "qwen_vl")
    _, cdtype = compute_place(pipe, "step1x_connector")
    return pipe.run_model("qwen_vl", pipe.qwen_vl,
                          lambda m: encoder.encode(prompt or "", reference, device=qdev, dtype=cdtype))


def connector_texts(ctx: ConditionContext, hidden: torch.Tensor, mask: torch.Tensor) -> list:
    """The connector's text (tokens and pooled vector) at every step's sigma, where the transformer computes."""
    pipe = ctx.pipe
    cdev, cdtype = compute_place(pipe, "step1x_connector")

    def run(connector):
        out = []
        for i in range(ctx.steps):
            sigma = ctx.sigmas[i].expand(1).to(device=cdev, dtype=cdtype)
            txt, pooled = connector(hidden.to(cdev, cdtype), sigma, mask.to(cdev))
            txt = txt.to(ctx.device, ctx.dtype)
            out.append(Text(txt, pooled.to(ctx.device, ctx.dtype), lat.text_ids(txt.shape[1], device=ctx.device)))
        return out
    return pipe.run_model("step1x_connector", pipe.step1x_connector, run)
