"""Checking the entity prompts and masks a person gives (PIL only, no torch: the studio's tabs may use it)."""
from __future__ import annotations

from PIL import Image

from ..errors import EngineError

MASK_HINT = "white marks the entity's region, black the rest"


def _as_list(value, single_type) -> list:
    if value is None:
        return []
    if isinstance(value, single_type):
        return [value]
    return list(value)


def check_entities(prompts, masks) -> tuple[list, list]:
    """The entity prompts and masks as lists of equal length (a single prompt / mask is a list of one), or an
    EngineError naming the entity at fault (numbered from 1) and the fix."""
    prompts, masks = _as_list(prompts, str), _as_list(masks, Image.Image)
    for i in range(max(len(prompts), len(masks))):
        prompt = prompts[i] if i < len(prompts) else None
        mask = masks[i] if i < len(masks) else None
        if prompt is None or not str(prompt).strip():
            raise EngineError(
                f"EliGen mask {i + 1} has no entity prompt: eligen_entity_prompts needs one prompt per mask, in the "
                f"same order. Describe what goes in that region, or remove the mask.")
        if mask is None:
            raise EngineError(
                f"EliGen entity {i + 1} ({prompt!r}) has no mask: eligen_entity_masks needs one mask per entity "
                f"prompt, in the same order ({MASK_HINT}). Add its mask, or remove the prompt.")
        if not isinstance(mask, Image.Image):
            raise EngineError(f"EliGen entity {i + 1} ({prompt!r}): its mask is a {type(mask).__name__}, not an "
                              f"image. Pass PIL images ({MASK_HINT}).")
    return [str(p) for p in prompts], masks


def mask_notes(masks, width: int, height: int) -> list:
    """What fitting the masks to a ``width`` x ``height`` image does that a person should know: a mask of another
    shape is stretched (the seed resizes every mask straight to the output)."""
    notes = []
    for i, m in enumerate(masks):
        w, h = m.size
        if abs(w / h - width / height) > 0.01 * width / height:
            notes.append(f"EliGen mask {i + 1} ({w}x{h}) was stretched to the image's shape ({width}x{height}).")
    return notes
