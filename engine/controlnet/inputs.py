"""``ControlNetInput``: one control image for one ControlNet, with the seed's fields and defaults.

``start`` / ``end`` count the denoising progress down from 1 (the first step) to 0 (the last): a ControlNet acts
at the steps whose progress lies in [end, start], so the defaults (1, 0) mean every step. ``controlnet_id`` is the
ControlNet's place among the files given to ``from_pretrained`` (0 = the first ControlNet file). ``processor_id``
names the control image's kind for the InstantX Union ControlNet (canny, tile, depth, blur, pose, gray, lq); other
ControlNets ignore it. ``inpaint_mask`` (white = repaint) goes with the alimama Inpainting ControlNet, whose image
is ``image`` (or ``inpaint_image`` when given).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from PIL import Image


@dataclass
class ControlNetInput:
    controlnet_id: int = 0
    scale: float = 1.0
    start: float = 1.0
    end: float = 0.0
    image: Optional[Image.Image] = None
    inpaint_image: Optional[Image.Image] = None
    inpaint_mask: Optional[Image.Image] = None
    processor_id: Optional[str] = None

    def active(self, step: int, steps: int) -> bool:
        """Whether this input acts at ``step`` (0-based) of ``steps``: its progress, (steps-1-step)/(steps-1),
        lies in [end, start] (the seed's rule, so one step counts as progress 1)."""
        progress = (steps - 1 - step) / max(steps - 1, 1)
        return self.end <= progress <= self.start
