"""How each FLUX transformer's inputs are cut across the ranks and its output put back together (diffusers' context
parallel plans, ``ContextParallelInput`` / ``ContextParallelOutput``), as the engine's pipelines call them.

Every pipeline here passes the position ids as 2-D tensors, (tokens, axes), so every plan cuts them on dim 0:

- FLUX.1 (``FluxTransformer2DModel``): the same as diffusers' own plan (image and text tokens, their ids; the
  output gathered after ``proj_out``).
- FLUX.2 (``Flux2Transformer2DModel``): diffusers' plan expects (1, tokens, 4) ids and would leave our 2-D ones whole
  while cutting the tokens; this plan cuts them on dim 0 instead.
- FLUX 3 (``Flux3Transformer2DModel``): diffusers 0.42.1 ships no plan; this one cuts the image, reference-image and
  text tokens and their ids. Every mode's attention then sees all of its tokens again through the all-to-all, and
  the joint blocks' [text, image, references] sequence is each rank's slices of the three, a reordering attention
  does not see (no mask; each token keeps its own rotary position).
"""
from __future__ import annotations

from .group import ParallelError


# diffusers exports ContextParallelConfig at the top level but not these two plan entries: their module is the one
# place they live (diffusers.models._modeling_parallel, as the model classes themselves import them).
def _inputs(names_3d: tuple, names_2d: tuple) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput
    plan = {name: ContextParallelInput(split_dim=1, expected_dims=3, split_output=False) for name in names_3d}
    plan.update({name: ContextParallelInput(split_dim=0, expected_dims=2, split_output=False) for name in names_2d})
    return plan


def _gather_proj_out() -> dict:
    from diffusers.models._modeling_parallel import ContextParallelOutput
    return {"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


# (class name, the forward's token inputs (batch, tokens, width), their ids (tokens, axes))
TOKEN_INPUTS = {
    "FluxTransformer2DModel": (("hidden_states", "encoder_hidden_states"), ("img_ids", "txt_ids")),
    "Flux2Transformer2DModel": (("hidden_states", "encoder_hidden_states"), ("img_ids", "txt_ids")),
    "Flux3Transformer2DModel": (("hidden_states", "encoder_hidden_states", "image_cond_hidden_states"),
                                ("img_ids", "txt_ids", "image_cond_ids")),
}


def family_of(dit) -> str:
    """The diffusers class among TOKEN_INPUTS that ``dit`` is (or derives from), or ParallelError."""
    for cls in type(dit).__mro__:
        if cls.__name__ in TOKEN_INPUTS:
            return cls.__name__
    raise ParallelError(f"Context parallelism runs FLUX.1, FLUX.2 and FLUX 3 transformers (diffusers' "
                        f"{', '.join(TOKEN_INPUTS)}); this pipeline's transformer is {type(dit).__name__}.")


def cp_plan(dit) -> dict:
    """The context parallel plan for ``dit`` as the engine's pipelines call it."""
    names_3d, names_2d = TOKEN_INPUTS[family_of(dit)]
    return {"": _inputs(names_3d, names_2d), **_gather_proj_out()}


def token_inputs(dit) -> tuple:
    """(token input names, id input names) that the plan cuts."""
    return TOKEN_INPUTS[family_of(dit)]
