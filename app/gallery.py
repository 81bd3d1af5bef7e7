"""The results gallery: the session's images, newest first, and the selected one's recipe with a restore button
(wired by the tab: ``app.restore.wire_restore``)."""
from __future__ import annotations

import dataclasses

import gradio as gr

from app.recipe_text import result_info


@dataclasses.dataclass
class ResultsPanel:
    """The session's images, newest first, and the recipe of the selected one."""

    gallery: gr.Gallery
    info: gr.Textbox
    restore: gr.Button
    history: gr.State      # list of result dicts (path, seed, width, height, recipe, info), newest first
    selected: gr.State     # the selected result dict (or None)


CANCELLED_INFO = "Cancelled."      # the info a cancelled job returns (app.jobs.run_job)


def caption(result: dict) -> str:
    return f"seed {result.get('seed')} · {result.get('width')}×{result.get('height')}"


def gallery_value(history: list[dict]) -> list[tuple[str, str]]:
    return [(item["path"], caption(item)) for item in history]


def build_results_panel(label: str = "Results", height: int | str = 560, id_prefix: str = "") -> ResultsPanel:
    """The gallery, the selected image's info and a restore button. ``id_prefix`` keeps element ids unique when
    several tabs have one ("edit-" gives #edit-results-gallery, #edit-selected-info, #edit-restore-selected)."""
    gallery = gr.Gallery(
        label=label,
        show_label=False,
        columns=4,
        height=height,
        object_fit="contain",
        preview=True,
        allow_preview=True,
        interactive=False,
        buttons=["download", "fullscreen"],
        elem_id=f"{id_prefix}results-gallery",
        elem_classes=["results-gallery"],
    )
    with gr.Group(elem_classes=["info-group"]):
        info = gr.Textbox(
            label="Image info",
            lines=5,
            max_lines=14,
            interactive=False,
            buttons=["copy"],
            placeholder="The settings of the selected image appear here.",
            elem_id=f"{id_prefix}selected-info",
            elem_classes=["recipe-text"],
        )
        restore = gr.Button("↺ Restore these settings", size="sm", elem_id=f"{id_prefix}restore-selected")
    history = gr.State([])
    selected = gr.State(None)

    def on_select(items: list[dict], evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not items or index is None or not 0 <= index < len(items):
            return gr.update(), None
        return result_info(items[index]), items[index]

    gallery.select(on_select, inputs=[history], outputs=[info, selected], queue=False, api_visibility="private")

    def after_cancel(text, chosen):
        """A cancelled job answers "Cancelled." as its info (app.jobs: API clients read it); the page said so in a
        message already, and the box goes back to the image shown beside it."""
        if text != CANCELLED_INFO:
            return gr.update()
        return result_info(chosen) if isinstance(chosen, dict) else ""

    info.change(after_cancel, inputs=[info, selected], outputs=[info], queue=False, show_progress="hidden",
                api_visibility="private")
    return ResultsPanel(gallery=gallery, info=info, restore=restore, history=history, selected=selected)


def add_results(new: list[dict] | None, history: list[dict] | None):
    """New results go first; the newest image is selected and its recipe shown."""
    history = list(new or []) + list(history or [])
    if not new:
        return gr.update(), history, gr.update(), gr.update()
    return (
        gr.update(value=gallery_value(history), selected_index=0),
        history,
        result_info(new[0]),
        new[0],
    )
