"""EliGen's regional prompts as a condition: entity prompts + masks -> the transformer's joined text, the joint
attention mask, and (optionally) inpainting of the entity regions into ``input_image``.

``pipe(eligen_entity_prompts=[...], eligen_entity_masks=[PIL, ...], eligen_enable_on_negative=False,
eligen_enable_inpaint=False)``; the masks, prompts and checks live in ``engine.eligen``. Its hooks:

- ``transformer_text``: ``[entities | prompt]``. Only the transformer reads it: other conditions (ControlNet) see
  the plain prompt, as in the seed, whose ControlNet runs on the global prompt before EliGen's tokens are joined.
- ``attention_kwargs``: ``{"attention_mask": ...}``: diffusers' ``FluxAttnProcessor`` passes it to
  scaled_dot_product_attention in every double and single block, so no processor is installed and LoRA adapters
  (forward hooks on the linear layers) are untouched. Image tokens of other conditions (Kontext's references) come
  after the image's and belong to no entity.
- ``velocity``, with ``eligen_enable_inpaint`` (the EliGen paper's "inpainting fusion", the seed's
  ``inpaint_fusion`` with background weight 0): outside the union of the entity masks the velocity is replaced by
  the one that walks the latents straight to the input image's (``(x_t - x_input) / sigma``), so the unmasked area
  ends exactly on the input; inside, the model's velocity.

The positive pass always gets EliGen, the negative one only with ``eligen_enable_on_negative`` and CFG.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from .. import latents as lat
from ..eligen import masks as masks_mod
from ..eligen import prompts as prompts_mod
from ..eligen.entities import MASK_HINT, check_entities, mask_notes
from ..errors import EngineError
from .base import Condition, ConditionContext, StepState, Text


class EliGenCondition(Condition):
    name = "eligen"
    call_args = {"eligen_entity_prompts": None, "eligen_entity_masks": None, "eligen_enable_on_negative": False,
                 "eligen_enable_inpaint": False}

    def __init__(self, regions: torch.Tensor, entity_embs: torch.Tensor, on_negative: bool = False,
                 inpaint_cells: Optional[torch.Tensor] = None, clean_tokens: Optional[torch.Tensor] = None,
                 sigmas: Optional[torch.Tensor] = None, notes: Sequence[str] = ()):
        self.regions = regions.bool()                  # (N, image tokens) on the token grid
        self.entity_embs = entity_embs                 # (N, T, D)
        self.on_negative = bool(on_negative)
        self.notes = list(notes)                       # what was done to the masks, for the person
        self._masks: dict = {}
        self.inpaint_tokens = None
        if inpaint_cells is not None:
            # (1, N, 64): the cell mask for every latent channel, packed like the latents.
            cells = inpaint_cells.to(clean_tokens.device)[None, None].expand(1, lat.LATENT_CHANNELS, -1, -1)
            self.inpaint_tokens = lat.pack(cells.float()) > 0.5
            self.clean_tokens = clean_tokens.float()
            self.sigmas = sigmas

    # ------------------------------------------------------------------------------------------- preparing
    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["EliGenCondition"]:
        """Checks the entities, encodes their prompts (T5 at the call's ``t5_sequence_length``) and reads the masks
        (one PIL mask per prompt, any size: stretched to the output). ``eligen_enable_inpaint`` needs the call's
        ``input_image`` (``ctx.clean_latents``)."""
        prompts, masks = check_entities(args["eligen_entity_prompts"], args["eligen_entity_masks"])
        if not prompts:
            return None
        regions = masks_mod.entity_token_regions(masks, ctx.height, ctx.width)
        for i, region in enumerate(regions):
            if not region.any():
                raise EngineError(
                    f"EliGen entity {i + 1} ({prompts[i]!r}): its mask covers no part of the image ({MASK_HINT}). "
                    f"Paint its region, or remove the entity.")
        inpaint_cells = clean_tokens = None
        if args["eligen_enable_inpaint"]:
            if ctx.clean_latents is None:
                raise EngineError("eligen_enable_inpaint repaints the entity regions of an input image: pass "
                                  "input_image=..., or turn eligen_enable_inpaint off.")
            inpaint_cells = masks_mod.inpaint_region(masks, ctx.height, ctx.width)
            clean_tokens = lat.pack(ctx.clean_latents.float())
        entity_embs = prompts_mod.encode_entities(ctx.pipe, prompts, ctx.t5_sequence_length)
        return cls(regions, entity_embs, on_negative=bool(args["eligen_enable_on_negative"]) and ctx.cfg_scale != 1.0,
                   inpaint_cells=inpaint_cells, clean_tokens=clean_tokens, sigmas=ctx.sigmas,
                   notes=mask_notes(masks, ctx.width, ctx.height))

    @classmethod
    def extra_tokens(cls, args: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
        """As many text tokens again as the prompt's per entity."""
        prompts = args.get("eligen_entity_prompts")
        return t5_sequence_length * len(prompts) if isinstance(prompts, (list, tuple)) else 0

    # ----------------------------------------------------------------------------------------------- hooks
    @property
    def num_entities(self) -> int:
        return self.regions.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.entity_embs.shape[1]

    def applies(self, negative: bool) -> bool:
        """EliGen shapes the positive pass always, the negative one only with ``eligen_enable_on_negative``."""
        return self.on_negative or not negative

    def transformer_text(self, text: Text, negative: bool) -> Text:
        """``[entities | prompt]`` (1, (N + 1) * T, D) when EliGen applies to this pass; on the negative pass the
        negative prompt stands for every entity."""
        if not self.applies(negative):
            return text
        if negative:
            joined = prompts_mod.negative_join(text.embeds, self.num_entities)
        else:
            joined = prompts_mod.join(self.entity_embs, text.embeds)
        return Text(joined, text.pooled, prompts_mod.text_ids_for(joined))

    def attention_mask(self, num_image_tokens: int, device, dtype) -> torch.Tensor:
        """(1, 1, L, L) additive mask, built once per shape and kept (the same for both CFG passes)."""
        key = (int(num_image_tokens), str(device), dtype)
        if key not in self._masks:
            mask = masks_mod.joint_attention_mask(self.regions.to(device), self.prompt_len, num_image_tokens)
            self._masks[key] = masks_mod.additive(mask, dtype)[None, None]
        return self._masks[key]

    def attention_kwargs(self, state: StepState) -> dict:
        if not self.applies(state.negative):
            return {}
        hidden = state.hidden_states
        return {"attention_mask": self.attention_mask(hidden.shape[1], hidden.device, hidden.dtype)}

    def velocity(self, v: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """With inpainting: the model's velocity inside the entity regions, the way back to the input outside."""
        if self.inpaint_tokens is None:
            return v
        to_input = (tokens.float() - self.clean_tokens) / float(self.sigmas[step])
        return torch.where(self.inpaint_tokens, v.float(), to_input)
