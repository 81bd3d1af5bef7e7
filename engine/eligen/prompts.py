"""Entity prompts: encoded like the global prompt and joined in front of it.

The seed encodes the entity prompts with T5 at the same ``t5_sequence_length`` as the global prompt (padded to it,
truncated at it; CLIP's pooled vector of an entity is unused) and puts them before the global prompt's tokens:
``[entity 1 | ... | entity N | global]``, every part ``t5_sequence_length`` tokens, text position ids all zero.
On the negative branch (``eligen_enable_on_negative``) every entity's prompt is the negative prompt itself.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import latents as lat


def encode_entities(pipe, prompts: Sequence[str], t5_sequence_length: int) -> torch.Tensor:
    """(N, T, D) T5 encodings of the entity prompts, through the pipeline's encoder (offloading, prompt cache)."""
    return torch.cat([pipe.encode_prompt(p, t5_sequence_length)[0] for p in prompts], dim=0)


def join(entity_embs: torch.Tensor, global_emb: torch.Tensor) -> torch.Tensor:
    """(N, T, D) entities + (1, T, D) global -> (1, (N + 1) * T, D), entities first."""
    n, t, d = entity_embs.shape
    entities = entity_embs.to(device=global_emb.device, dtype=global_emb.dtype).reshape(1, n * t, d)
    return torch.cat([entities, global_emb], dim=1)


def negative_join(negative_emb: torch.Tensor, n: int) -> torch.Tensor:
    """The negative branch with EliGen: the negative prompt stands for every entity, (1, (n + 1) * T, D)."""
    return negative_emb.repeat(1, n + 1, 1)


def text_ids_for(emb: torch.Tensor) -> torch.Tensor:
    return lat.text_ids(emb.shape[1], device=emb.device)
