"""The live preview of a tab's job: a picture of the image as it denoises, above the results while the job runs.

A tab builds one with ``build_live_preview(prefix)`` in its results column and, in the job's event chain:

- its start event (the page's own, before the job) outputs ``bool(toggle)`` into ``wanted``;
- its job handler takes ``wanted`` as its last input and is a generator over ``app.jobs.stream_job(...,
  previews=wanted)``, with ``file`` as its last output;
- ``wire_live_preview(preview, job)`` shows each file as it comes and hides the box when the job ends or fails.

``file`` and ``wanted`` are States: no part of the tab's API, so API clients pass and get what they did before and
never pay for pictures they cannot see. No torch here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

LABEL = "Preview (denoising)"
TOGGLE = "Live preview while generating"


@dataclasses.dataclass(frozen=True)
class LivePreview:
    image: Any       # gr.Image: the latest picture, visible only while a job runs
    file: Any        # gr.State: the latest picture's file (None: no job, or it ended)
    wanted: Any      # gr.State: whether this page's job makes pictures (from ``toggle`` when the job starts)
    toggle: Any      # gr.Checkbox: the person's setting


def build_live_preview(prefix: str) -> LivePreview:
    """The preview box (``#<prefix>-preview``) and its checkbox (``#<prefix>-live-preview``), in the current layout."""
    image = gr.Image(label=LABEL, interactive=False, visible=False, height=320, buttons=[],
                     elem_id=f"{prefix}-preview")
    toggle = gr.Checkbox(value=True, label=TOGGLE, container=False, elem_id=f"{prefix}-live-preview")
    return LivePreview(image=image, file=gr.State(None), wanted=gr.State(False), toggle=toggle)


def show_preview(path: Any) -> Any:
    """The box for a picture's file: shown with it, or hidden when there is none (the job ended)."""
    return gr.update(value=path, visible=True) if path else gr.update(value=None, visible=False)


def wire_live_preview(preview: LivePreview, job: Any) -> None:
    """Show each picture of the job event ``job`` as it comes; hide the box when it fails (its last item hides it
    when it ends)."""
    job.failure(lambda: None, outputs=[preview.file], queue=False, api_visibility="private")
    preview.file.change(show_preview, inputs=[preview.file], outputs=[preview.image], queue=False,
                        api_visibility="private", show_progress="hidden")
