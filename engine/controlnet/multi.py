"""``MultiControlNet``: the pipeline's one ``controlnet`` component, holding every loaded ControlNet in order.

``ControlNetInput.controlnet_id`` indexes ``nets`` (the order of the ControlNet files given to ``from_pretrained``),
so one role is planned and placed for all of them (they run at every step, beside the transformer).
"""
from __future__ import annotations

import torch

from ..errors import EngineError


class MultiControlNet(torch.nn.Module):
    def __init__(self, models):
        super().__init__()
        nets = []
        for m in (models if isinstance(models, (list, tuple)) else [models]):
            nets.extend(m.nets if isinstance(m, MultiControlNet) else [m])   # flattened: ids stay file order
        if not nets:
            raise EngineError("MultiControlNet needs at least one ControlNet.")
        self.nets = torch.nn.ModuleList(nets)
        self.flux_studio_files = [f for n in nets for f in getattr(n, "flux_studio_files", [])]
        self.flux_studio_role = "controlnet"
        self.flux_studio_format = "diffusers"
        self.flux_studio_description = "; ".join(getattr(n, "flux_studio_description", "a FLUX ControlNet")
                                                 for n in nets)

    def __len__(self) -> int:
        return len(self.nets)

    def net(self, controlnet_id) -> torch.nn.Module:
        """The ControlNet ``controlnet_id`` names, or a clear error."""
        try:
            i = int(controlnet_id)
        except (TypeError, ValueError):
            i = -1
        if not 0 <= i < len(self.nets):
            raise EngineError(f"controlnet_id {controlnet_id!r}: {len(self.nets)} ControlNet(s) are loaded, with ids "
                              f"0..{len(self.nets) - 1} in the order their files were given.")
        return self.nets[i]
