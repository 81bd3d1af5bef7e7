"""The ``EliGen`` condition: entity prompts + masks -> joined text tokens, the joint attention mask, and (optionally)
inpainting of the entity regions into ``input_image``.

The pipeline uses it in four places (see ``FluxImagePipeline.__call__``):

1. ``prepare_eligen(pipe, ...)`` once per image (checks the input, encodes the entity prompts, reads the masks);
   the result goes into the loop's ``conditions`` list.
2. ``transformer_text(eligen, emb, txt_ids, negative)`` at the transformer call: the text the transformer gets,
   ``[entities | prompt]``. Only the transformer gets it: other conditions (ControlNet) see the plain prompt, as in
   the seed, whose ControlNet runs on the global prompt before EliGen's tokens are joined.
3. ``dit_kwargs`` (the ``Condition`` interface) -> ``joint_attention_kwargs={"attention_mask": ...}``: diffusers'
   ``FluxAttnProcessor`` passes it to scaled_dot_product_attention in every double and single block, so no
   processor is installed and LoRA adapters (forward hooks on the linear layers) are untouched.
4. ``inpaint_velocity(v, tokens, step)`` after CFG, with ``eligen_enable_inpaint``.

Inpainting (the EliGen paper's "inpainting fusion", the seed's ``inpaint_fusion`` with background weight 0): outside
the union of the entity masks the velocity is replaced by the one that walks the latents straight to the input
image's (``(x_t - x_input) / sigma``), so the unmasked area ends exactly on the input; inside, the model's velocity.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import latents as lat
from ..conditions.base import Condition
from ..errors import EngineError
from . import masks as masks_mod
from . import prompts as prompts_mod
from .entities import MASK_HINT, check_entities, mask_notes


class EliGen(Condition):
    name = "eligen"

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

    @property
    def num_entities(self) -> int:
        return self.regions.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.entity_embs.shape[1]

    def applies(self, negative: bool) -> bool:
        """EliGen shapes the positive pass always, the negative one only with ``eligen_enable_on_negative``."""
        return self.on_negative or not negative

    def text(self, emb: torch.Tensor, negative: bool) -> torch.Tensor:
        """The transformer's text for this pass: (1, (N + 1) * T, D)."""
        if negative:
            return prompts_mod.negative_join(emb, self.num_entities)
        return prompts_mod.join(self.entity_embs, emb)

    def attention_mask(self, num_image_tokens: int, device, dtype) -> torch.Tensor:
        """(1, 1, L, L) additive mask, built once per shape and kept (the same for both CFG passes)."""
        key = (int(num_image_tokens), str(device), dtype)
        if key not in self._masks:
            mask = masks_mod.joint_attention_mask(self.regions.to(device), self.prompt_len, num_image_tokens)
            self._masks[key] = masks_mod.additive(mask, dtype)[None, None]
        return self._masks[key]

    def dit_kwargs(self, step: int, *, hidden_states: torch.Tensor, negative: bool, **_) -> dict:
        if not self.applies(negative):
            return {}
        mask = self.attention_mask(hidden_states.shape[1], hidden_states.device, hidden_states.dtype)
        return {"joint_attention_kwargs": {"attention_mask": mask}}

    def inpaint_velocity(self, v: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """With inpainting: the model's velocity inside the entity regions, the way back to the input outside."""
        if self.inpaint_tokens is None:
            return v
        to_input = (tokens.float() - self.clean_tokens) / float(self.sigmas[step])
        return torch.where(self.inpaint_tokens, v.float(), to_input)


def transformer_text(eligen: Optional[EliGen], emb: torch.Tensor, txt_ids: torch.Tensor, negative: bool = False):
    """(text embeddings, text ids) for the transformer call: the entity prompts joined in front of ``emb`` when
    EliGen applies to this pass, else ``emb`` and ``txt_ids`` unchanged."""
    if eligen is None or not eligen.applies(negative):
        return emb, txt_ids
    joined = eligen.text(emb, negative)
    return joined, prompts_mod.text_ids_for(joined)


# ------------------------------------------------------------------------------------------------ preparing
def prepare_eligen(pipe, entity_prompts=None, entity_masks=None, *, height: int, width: int,
                   t5_sequence_length: int = 512, enable_on_negative: bool = False, cfg_scale: float = 1.0,
                   enable_inpaint: bool = False, clean_latents: Optional[torch.Tensor] = None,
                   sigmas: Optional[torch.Tensor] = None) -> Optional[EliGen]:
    """The ``EliGen`` condition of one ``pipe(...)`` call, or None without entities.

    ``entity_prompts`` / ``entity_masks``: the seed's ``eligen_entity_prompts`` / ``eligen_entity_masks`` (one PIL
    mask per prompt, any size: stretched to the output). ``enable_on_negative`` applies EliGen to CFG's negative pass
    too (only when ``cfg_scale != 1``). ``enable_inpaint`` needs ``clean_latents`` (1, 16, H/8, W/8), the encoded
    input image, and the loop's ``sigmas``."""
    prompts, masks = check_entities(entity_prompts, entity_masks)
    if not prompts:
        return None
    regions = masks_mod.entity_token_regions(masks, height, width)
    for i, region in enumerate(regions):
        if not region.any():
            raise EngineError(
                f"EliGen entity {i + 1} ({prompts[i]!r}): its mask covers no part of the image ({MASK_HINT}). "
                f"Paint its region, or remove the entity.")
    inpaint_cells = None
    if enable_inpaint:
        if clean_latents is None or sigmas is None:
            raise EngineError("eligen_enable_inpaint repaints the entity regions of an input image: pass "
                              "input_image=..., or turn eligen_enable_inpaint off.")
        inpaint_cells = masks_mod.inpaint_region(masks, height, width)
    entity_embs = prompts_mod.encode_entities(pipe, prompts, t5_sequence_length)
    clean_tokens = lat.pack(clean_latents.float()) if clean_latents is not None and enable_inpaint else None
    return EliGen(regions, entity_embs, on_negative=bool(enable_on_negative) and cfg_scale != 1.0,
                  inpaint_cells=inpaint_cells, clean_tokens=clean_tokens, sigmas=sigmas,
                  notes=mask_notes(masks, width, height))
