"""Running an engine job from a tab: progress into Gradio's bar, cancel, the engine's notes as toasts, results.

Every tab that makes images runs ``run_job`` in its button's event and shows the same outputs (images, the first
image's info, its seed, the full results). No torch here.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from app.common import call_engine, is_cancelled
from app.widgets import result_info

CANCELLING = "Cancelling: the job stops after its current step."


def run_job(engine: Any, request: dict, progress: Any, title: str) -> tuple:
    """``engine.generate(request)`` with per-step progress. Returns (gallery items, info text, first seed, results);
    a cancelled job returns no images and "Cancelled."; an engine error becomes a gr.Error titled ``title``."""
    progress(0, desc="Starting…")

    def on_progress(done: int, total: int, message: str) -> None:
        progress((int(done), int(total) if total else None), desc=message, unit="steps")

    try:
        made = call_engine(engine.generate, request, progress=on_progress, title=title)
    except Exception as exc:  # noqa: BLE001 - only JobCancelled gets here; others are gr.Error
        if is_cancelled(exc):
            gr.Info(str(exc) or "Cancelled.")
            return [], "Cancelled.", None, []
        raise
    if not made:
        return [], "", None, []
    for note in made[0].get("notes") or []:
        gr.Info(note)
    images = [(item["path"], f"seed {item['seed']}") for item in made]
    return images, result_info(made[0]), made[0]["seed"], made


def cancel_job(engine: Any) -> None:
    engine.cancel()
    gr.Info(CANCELLING)


def busy() -> tuple:
    """(run button, cancel button) updates while a job runs."""
    return gr.update(visible=False), gr.update(visible=True)


def idle() -> tuple:
    return gr.update(visible=True), gr.update(visible=False)
