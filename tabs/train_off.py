"""The Train tab where training is off (a Hugging Face Space whose owner has not turned it on): it says why and how
to turn it on, and nothing in it trains. launch.py puts it in ``tabs.train``'s place (``instead_of_train``); no
training endpoint exists then. Its id differs from the Train tab's, so no tab offers to send images to it.

UI only; no torch.
"""
from __future__ import annotations

import html

import gradio as gr

from studio.space import TRAINING_OFF_NOTE

TITLE = "Train"
TAB_ID = "train-off"
TRAIN_TAB = "tabs.train"


def instead_of_train(tabs: list[str]) -> list[str]:
    """The studio's tab list with this module in the Train tab's place."""
    return [__name__ if name == TRAIN_TAB else name for name in tabs]


def build(ctx) -> None:
    gr.HTML(f"<div class='train-off' role='note'><strong>Training is off here.</strong> "
            f"{html.escape(TRAINING_OFF_NOTE)}</div>", elem_id="train-off-note", js_on_load=None)
