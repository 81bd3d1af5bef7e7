"""Nexus-GenV2: generation (no reference) and editing (``nexus_gen_reference_image``), the seed's
``FluxImageUnit_NexusGen``.

Whenever the pipeline holds Nexus-Gen's AR model, the positive prompt goes through it: its 81 target embeddings
become the positive prompt's T5-space tokens, through the generation adapter (text ids zero) or, with a reference
image, through the embedding merger together with the reference's vision tokens (text ids from
``editing_text_ids``). CLIP's pooled vector and the whole negative prompt stay the usual FLUX ones, as in the seed.
Nothing changes in the denoising loop.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from PIL import Image

from ..errors import EngineError
from .base import Condition, ConditionContext, Text
from .step1x import compute_place

AR, GENERATION, EDITING = "nexus_gen", "nexus_gen_generation_adapter", "nexus_gen_editing_adapter"


def editing_text_ids(latent_h: int, latent_w: int, target_grid, ref_grid) -> torch.Tensor:
    """The seed's ``get_editing_text_ids``: (target tokens + reference tokens, 3) float ids. Each image's merged
    token grid (side // 2) is spread over the latent grid (H/8 x W/8 cells): row i at i * latent_h / grid_h; the
    target's index is 0, the reference's 1."""
    parts = []
    for index, grid in ((0.0, target_grid), (1.0, ref_grid)):
        h, w = int(grid[1]), int(grid[2])
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h // 2)[:, None] * (latent_h / h)
        ids[..., 2] = torch.arange(w // 2)[None, :] * (latent_w / w)
        parts.append(ids.reshape(-1, 3))
    return torch.cat(parts, dim=0)


def _parts(pipe, reference):
    """(AR model, processor, decoder role, decoder) after the checks, each failing with what to load."""
    model = getattr(pipe, AR, None)
    if model is None:
        raise EngineError("nexus_gen_reference_image needs Nexus-GenV2: add ModelConfig(model_id=\"DiffSynth-Studio/"
                          "Nexus-GenV2\", origin_file_pattern=\"model*.safetensors\") and edit_decoder.bin.")
    processor = getattr(model, "flux_studio_processor", None)
    if processor is None:
        raise EngineError("Nexus-GenV2's processor is not loaded: download DiffSynth-Studio/Nexus-GenV2's processor/ "
                          "folder beside model*.safetensors, or pass nexus_gen_processor_config=ModelConfig(model_id="
                          "\"DiffSynth-Studio/Nexus-GenV2\", origin_file_pattern=\"processor/\") to from_pretrained.")
    role = EDITING if reference is not None else GENERATION
    decoder = getattr(pipe, role, None)
    if decoder is None:
        if reference is not None:
            raise EngineError("nexus_gen_reference_image edits an image, which needs Nexus-GenV2's edit_decoder.bin; "
                              "this pipeline has generation_decoder.bin (generation only). Load edit_decoder.bin, or "
                              "leave out the reference to generate.")
        raise EngineError("Nexus-GenV2 without a reference image generates, which needs generation_decoder.bin; this "
                          "pipeline has edit_decoder.bin (editing only). Pass nexus_gen_reference_image=<PIL image>, "
                          "or load generation_decoder.bin.")
    return model, processor, role, decoder


class NexusGenCondition(Condition):
    name = "nexus_gen"
    call_args = {"nexus_gen_reference_image": None}

    def __init__(self, embeds: torch.Tensor, ids: torch.Tensor):
        self.embeds = embeds                  # (1, T, joint_attention_dim) in the transformer's dtype
        self.ids = ids                        # (T, 3)

    @classmethod
    def requested(cls, args: Mapping, pipe) -> bool:
        # The AR model replaces the positive prompt whenever it is loaded, reference or not (as the seed's unit).
        return super().requested(args, pipe) or getattr(pipe, AR, None) is not None

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["NexusGenCondition"]:
        from ..nexus_gen.ar_model import target_embeddings
        reference = args.get("nexus_gen_reference_image")
        if reference is not None and not isinstance(reference, Image.Image):
            raise EngineError(f"nexus_gen_reference_image is a {type(reference).__name__}, not a PIL image; open it "
                              f"with engine.images.load_user_image (or PIL.Image.open) first.")
        pipe = ctx.pipe
        model, processor, role, decoder = _parts(pipe, reference)
        adev, _ = compute_place(pipe, AR)
        target, ref_tokens, grids = pipe.run_model(AR, model, lambda m: target_embeddings(
            m, processor, ctx.prompt or "", reference, device=adev))
        ddev, ddtype = compute_place(pipe, role)
        if reference is None:
            embeds = pipe.run_model(role, decoder, lambda d: d(target.unsqueeze(0).to(ddev, ddtype)))
            ids = torch.zeros(embeds.shape[1], 3)
        else:
            grids = grids.cpu()
            embeds = pipe.run_model(role, decoder, lambda d: d(
                target.unsqueeze(0).to(ddev, ddtype), grids[1:2], ref_tokens.unsqueeze(0).to(ddev, ddtype),
                grids[0:1]))
            ids = editing_text_ids(ctx.height // 8, ctx.width // 8, grids[1], grids[0])
        want = getattr(getattr(getattr(pipe, "dit", None), "config", None), "joint_attention_dim", None)
        if want is not None and embeds.shape[-1] != want:
            raise EngineError(f"Nexus-GenV2's decoder gives {embeds.shape[-1]}-wide tokens but the transformer reads "
                              f"{want}-wide text: load the DiT of the same decoder file.")
        return cls(embeds.to(ctx.device, ctx.dtype), ids.to(ctx.device))

    def prompt_text(self, text: Optional[Text], step: int, negative: bool) -> Optional[Text]:
        if negative or text is None:
            return text
        return Text(self.embeds, text.pooled, self.ids.to(device=text.ids.device, dtype=text.ids.dtype))


__all__ = ["NexusGenCondition", "editing_text_ids"]
