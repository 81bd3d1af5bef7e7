"""Saving and reading an EliGen layout (entity prompts + masks), in the folder format of DiffSynth-Studio's EliGen
app and example data (``examples/eligen/entity_control/example_N/``): ``0.png, 1.png, ...`` (one mask per entity,
white = its region) and ``prompts.json`` ``{"global_prompt": ..., "mask_prompts": [...], "seed": ...}``. Other
keys in ``prompts.json`` (a negative prompt, the size) are kept and returned. No torch: the studio's tabs may use it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Sequence

from PIL import Image

from ..errors import EngineError
from .entities import check_entities

PROMPTS_FILE = "prompts.json"


def save_layout(folder, prompt: str, entity_prompts: Sequence[str], entity_masks: Sequence[Image.Image],
                seed: Optional[int] = None, **extra) -> pathlib.Path:
    """Write a layout into ``folder`` (created; one that already holds a layout is never overwritten)."""
    entity_prompts, entity_masks = check_entities(entity_prompts, entity_masks)
    folder = pathlib.Path(folder)
    if (folder / PROMPTS_FILE).exists():
        raise EngineError(f"{folder} already holds an EliGen layout; choose another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(entity_masks):
        mask.save(folder / f"{i}.png")
    data = {"global_prompt": prompt, "mask_prompts": list(entity_prompts), "seed": seed, **extra}
    tmp = folder / f".{PROMPTS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
    tmp.replace(folder / PROMPTS_FILE)       # written last and whole: a folder with prompts.json is complete
    return folder


def load_layout(folder) -> dict:
    """{"prompt", "entity_prompts", "entity_masks" (PIL, loaded), "seed", plus any other saved keys}."""
    folder = pathlib.Path(folder)
    try:
        data = json.loads((folder / PROMPTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"{folder} is not an EliGen layout ({PROMPTS_FILE}: {exc}).") from exc
    prompts = list(data.pop("mask_prompts", []) or [])
    masks = []
    for i in range(len(prompts)):
        path = folder / f"{i}.png"
        if not path.exists():
            raise EngineError(f"The EliGen layout in {folder} lacks {path.name}, the mask of entity {i + 1} "
                              f"({prompts[i]!r}).")
        with Image.open(path) as img:
            img.load()
            masks.append(img.copy())
    return {"prompt": data.pop("global_prompt", ""), "entity_prompts": prompts, "entity_masks": masks,
            "seed": data.pop("seed", None), **data}
