"""Captions drafted for the Train tab's caption table by Qwen2.5-VL (``engine.training.captions``): only the empty
ones unless the person asks to redo all; nothing is written to the .txt files here (the run writes the table when it
starts, after the person has read it).

The model is the one Step1X-Edit uses, ``<models>/Qwen/Qwen2.5-VL-7B-Instruct``; a studio on demo weights uses the
Step1X-Edit random-weight demo's tiny Qwen2.5-VL instead (its captions are gibberish, but every step runs).
"""
from __future__ import annotations

import pathlib
from typing import Optional

from engine.errors import EngineError

from .datasets import caption_rows

QWEN_HELP = ("Drafting captions needs Qwen2.5-VL-7B-Instruct (the model Step1X-Edit uses), which is not in the models "
             "folder: put the whole Qwen/Qwen2.5-VL-7B-Instruct folder at {where}, or write the captions in the table.")


def qwen_folder(models_dir, demo: bool) -> tuple[Optional[pathlib.Path], bool]:
    """(the Qwen2.5-VL folder to caption with or None, whether it is the random-weight demo's)."""
    from engine.training.captions import find_qwen_folder  # noqa: PLC0415 - imports torch
    real = find_qwen_folder(models_dir)
    if real is not None or not demo:
        return real, False
    from engine.demo import write_step1x_demo  # noqa: PLC0415
    from engine.demo.step1x import QWEN_SUBDIR  # noqa: PLC0415
    from engine.registry import STEP1X_DEMO_ID  # noqa: PLC0415
    write_step1x_demo(models_dir)            # written once, on first use (as the Edit tab does)
    return pathlib.Path(models_dir) / STEP1X_DEMO_ID / QWEN_SUBDIR, True


def images_to_caption(guard, folder, rows, overwrite: bool) -> tuple[list[list[str]], list[int], pathlib.Path]:
    """The table's rows, the indices of those to draft (empty captions, or all with ``overwrite``), the folder."""
    if not folder:
        raise EngineError("No images yet: upload images (or load a folder) first, then draft their captions.")
    folder = guard.check(pathlib.Path(str(folder)).expanduser(), "the dataset folder")
    table = [[name, caption] for name, caption in caption_rows(rows)]
    for name, _ in table:
        image = (folder / name).resolve()
        if not image.is_relative_to(folder) or not image.is_file():
            raise EngineError(f"{name} is not in the dataset folder {folder} (was it renamed or deleted?). "
                              f"Load the folder again.")
    todo = [i for i, (_, caption) in enumerate(table) if overwrite or not caption.strip()]
    return table, todo, folder


def draft(table: list[list[str]], todo: list[int], folder: pathlib.Path, qwen: pathlib.Path, device: str,
          demo: bool) -> dict:
    """Caption ``table[i]`` for each ``i`` in ``todo`` with the model in ``qwen``: ``{"rows", "drafted", "note"}``."""
    from PIL import Image  # noqa: PLC0415

    from engine.training.captions import Captioner  # noqa: PLC0415 - imports torch
    captioner = Captioner(qwen, device=device)
    try:
        for i in todo:
            with Image.open(folder / table[i][0]) as image:
                table[i][1] = captioner.caption(image)
    finally:
        captioner.close()
    note = (f"Drafted {len(todo)} caption{'s' if len(todo) != 1 else ''} with Qwen2.5-VL: read and correct them "
            f"in the table before training.")
    if demo:
        note += " (Random-weight demo model: its captions are gibberish.)"
    return {"rows": table, "drafted": len(todo), "note": note}
