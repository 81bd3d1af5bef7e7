"""Reordering and removing the images of a reference gallery (Edit's "More reference images").

A gallery adds images (upload, paste) but cannot move or drop one. The order matters: FLUX.2 and Kontext give each
reference its own place (FLUX.2's position offset t = 10, 20, ... follows it), so a person picks a thumbnail and
moves it earlier or later, or removes it. The selection follows the moved image.

``order_controls(gallery, prefix)`` adds the three buttons under a gallery; the functions below are the pure list
operations they run (tested without a browser).
"""
from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from .uploads import gallery_paths

NOTHING_SELECTED = "Select a reference image first (click its thumbnail), then move or remove it."


def moved(paths: list, index: Optional[int], step: int) -> tuple[list, Optional[int]]:
    """``paths`` with the item at ``index`` moved ``step`` places (kept within the list), and its new index."""
    if index is None or not 0 <= index < len(paths):
        return list(paths), None
    target = min(max(index + step, 0), len(paths) - 1)
    out = list(paths)
    out.insert(target, out.pop(index))
    return out, target


def removed(paths: list, index: Optional[int]) -> tuple[list, Optional[int]]:
    """``paths`` without the item at ``index``; the selection goes to the item that took its place (or none)."""
    if index is None or not 0 <= index < len(paths):
        return list(paths), None
    out = list(paths[:index]) + list(paths[index + 1:])
    return out, (min(index, len(out) - 1) if out else None)


def order_controls(gallery: gr.Gallery, prefix: str, visible: bool = True) -> gr.Row:
    """"Earlier", "Later" and "Remove" under ``gallery`` for its selected image (#<prefix>-earlier, -later,
    -remove); returns their row (to show and hide with the gallery)."""
    selected = gr.State(None)
    with gr.Row(elem_id=f"{prefix}-order", visible=visible) as row:
        earlier = gr.Button("◀ Earlier", size="sm", elem_id=f"{prefix}-earlier")
        later = gr.Button("Later ▶", size="sm", elem_id=f"{prefix}-later")
        remove = gr.Button("Remove", size="sm", variant="stop", elem_id=f"{prefix}-remove")

    def on_select(evt: gr.SelectData):
        return evt.index if isinstance(evt.index, int) else None

    def apply(value: Any, index: Optional[int], operation):
        paths = gallery_paths(value)
        if index is None or not 0 <= index < len(paths):
            gr.Warning(NOTHING_SELECTED)
            return gr.update(), None
        out, new_index = operation(paths, index)
        return gr.update(value=out, selected_index=new_index), new_index

    quiet = dict(show_progress="hidden", api_visibility="private", queue=True)
    gallery.select(on_select, outputs=[selected], **quiet)
    gallery.upload(lambda: None, outputs=[selected], **quiet)      # new images: the old index means nothing now
    earlier.click(lambda v, i: apply(v, i, lambda p, k: moved(p, k, -1)), inputs=[gallery, selected],
                  outputs=[gallery, selected], **quiet)
    later.click(lambda v, i: apply(v, i, lambda p, k: moved(p, k, 1)), inputs=[gallery, selected],
                outputs=[gallery, selected], **quiet)
    remove.click(lambda v, i: apply(v, i, removed), inputs=[gallery, selected], outputs=[gallery, selected], **quiet)
    return row
