"""Putting ControlNets on an already-built pipeline (the studio loads them per job, after the base model)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .load import check_compatible, load_controlnet
from .multi import MultiControlNet


def attach_controlnets(pipe, controlnets: Optional[Sequence] = None, torch_dtype=None) -> Optional[MultiControlNet]:
    """Make exactly ``controlnets`` the pipeline's ControlNets (ids in this order) and re-plan memory with them;
    None or [] removes them. Each item is a loaded ControlNet (``load_controlnet``) or its file(s), loaded here in
    ``torch_dtype`` (default: the pipeline's). Returns the installed ``MultiControlNet`` (or None)."""
    models = []
    for item in controlnets or []:
        if isinstance(item, torch.nn.Module):
            models.append(item)
        else:
            models.append(load_controlnet(item, torch_dtype=torch_dtype or pipe.torch_dtype, device="cpu"))
    multi = MultiControlNet(models) if models else None
    check_compatible(multi, pipe.dit)          # before anything changes: a refused file leaves the pipeline as it was
    pipe.residency.offload_all()
    pipe.controlnet = None
    pipe.model_files.pop("controlnet", None)
    pipe.set_models({"controlnet": multi} if multi is not None else {})
    return multi
