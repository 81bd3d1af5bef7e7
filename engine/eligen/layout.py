"""Saving and reading an EliGen layout (entity prompts + masks), in the folder format of DiffSynth-Studio's EliGen
app and example data (``examples/eligen/entity_control/example_N/``): ``0.png, 1.png, ...`` (one mask per entity,
white = its region) and ``prompts.json`` ``{"global_prompt": ..., "mask_prompts": [...], "seed": ...}``. Other
keys in ``prompts.json`` (a negative prompt, the size) are kept and returned. No torch: the studio's tabs may use it.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence

from PIL import Image

from .. import safe_files
from ..errors import EngineError
from ..images import load_pixels, open_checked
from ..sizes import MAX_SIZE, MIN_SIZE
from .entities import check_entities

PROMPTS_FILE = "prompts.json"
MAX_PROMPTS_BYTES = 1 << 20       # a prompts.json larger than this is no layout (read only after this check)
MAX_LAYOUT_ENTITIES = 64


def save_layout(folder, prompt: str, entity_prompts: Sequence[str], entity_masks: Sequence[Image.Image],
                seed: Optional[int] = None, **extra) -> pathlib.Path:
    """Write a layout into ``folder`` (created; one that already holds a layout is never overwritten)."""
    entity_prompts, entity_masks = check_entities(entity_prompts, entity_masks)
    folder = pathlib.Path(folder)
    if (folder / PROMPTS_FILE).exists():
        raise EngineError(f"{folder} already holds an EliGen layout; choose another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(entity_masks):
        safe_files.save_image(mask, folder / f"{i}.png")
    data = {"global_prompt": prompt, "mask_prompts": list(entity_prompts), **extra}
    if seed is not None:        # no "seed": null: a layout saved without a seed says nothing about one
        data["seed"] = int(seed)
    # Written last and whole: a folder with prompts.json is complete.
    safe_files.write_text(folder / PROMPTS_FILE, json.dumps(data, indent=4, ensure_ascii=False))
    return folder


def load_layout(folder) -> dict:
    """{"prompt", "entity_prompts", "entity_masks" (PIL, loaded), "seed", plus any other saved keys}.

    Everything is checked before it is allocated: the size of prompts.json, the layout's width and height, the
    number of entities and each mask's header (at most MAX_SIZE px a side), so a hostile layout costs no memory."""
    folder = pathlib.Path(folder)
    data = read_prompts(folder)
    prompts = list(data.pop("mask_prompts", []) or [])
    if len(prompts) > MAX_LAYOUT_ENTITIES:
        raise EngineError(f"The EliGen layout in {folder} has {len(prompts)} entities; at most "
                          f"{MAX_LAYOUT_ENTITIES} are read. Remove some.")
    masks = [read_mask(folder, i, prompt) for i, prompt in enumerate(prompts)]
    return {"prompt": data.pop("global_prompt", ""), "entity_prompts": prompts, "entity_masks": masks,
            "seed": data.pop("seed", None), **data}


def read_prompts(folder) -> dict:
    """prompts.json of a layout folder, its size checked before it is read and the layout's size after."""
    folder = pathlib.Path(folder)
    path = folder / PROMPTS_FILE
    try:
        if path.stat().st_size > MAX_PROMPTS_BYTES:
            raise EngineError(f"{PROMPTS_FILE} of the EliGen layout in {folder} is over "
                              f"{MAX_PROMPTS_BYTES >> 20} MB; it is no layout file.")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"{folder} is not an EliGen layout ({PROMPTS_FILE}: {exc}).") from exc
    if not isinstance(data, dict) or not isinstance(data.get("mask_prompts", []) or [], list):
        raise EngineError(f"{folder} is not an EliGen layout ({PROMPTS_FILE} holds no mask_prompts list).")
    check_layout_size(data.get("width"), data.get("height"), folder)
    return data


def check_layout_size(width, height, where) -> None:
    """A layout's width and height (either may be absent) must be a canvas size, before any mask is fitted to it."""
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        try:
            ok = MIN_SIZE <= int(value) <= MAX_SIZE
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise EngineError(f"The EliGen layout in {where} has the {name} {str(value)[:20]!r}; a layout's size is "
                              f"{MIN_SIZE}..{MAX_SIZE} px a side. Save the layout again from the EliGen tab.")


def read_mask(folder, i: int, prompt) -> Image.Image:
    """Entity ``i``'s mask (loaded, its own mode), its header checked before decoding (at most MAX_SIZE a side)."""
    path = pathlib.Path(folder) / f"{i}.png"
    if not path.is_file():
        raise EngineError(f"The EliGen layout in {folder} lacks {path.name}, the mask of entity {i + 1} "
                          f"({prompt!r}).")
    name = f"{path.name} of the EliGen layout"
    with open_checked(path, name, max_pixels=MAX_SIZE * MAX_SIZE, max_side=MAX_SIZE) as img:
        return load_pixels(img, name).copy()
