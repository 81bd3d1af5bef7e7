"""Image inputs that refuse a bad upload with the studio's own message, decided from the file's header.

Gradio's ``gr.Image`` and ``gr.ImageEditor`` open an upload with Pillow in ``preprocess``, before any handler runs:
an empty file, a text file named .png or a 30000x30000 picture fails there as "Could not preprocess input component
at index 0", and a decompression bomb is decoded before anything can refuse it. These subclasses read the header
first (``engine.images.read_header``: Pillow only, nothing decoded) and raise ``gr.Error`` naming the input, the
file and the problem; ``Blocks.preprocess_data`` re-raises a ``gr.Error`` as it is (any other exception is wrapped).
Use them as drop-in replacements: ``from app import uploads`` ... ``uploads.Image(label=..., type="filepath")``.
"""
from __future__ import annotations

import base64
import binascii
import html
import pathlib
from typing import Any, Optional

import gradio as gr

from engine.errors import EngineError
from engine.images import MAX_PIXELS, MAX_SIDE, check_image_file


def input_name(label: Optional[str]) -> str:
    """The input as a person knows it: its label without the hint after a colon or in brackets."""
    text = str(label or "The image").split(":")[0].split(" (")[0].strip()
    return text or "The image"


def check_upload(data: Any, label: Optional[str], max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> None:
    """Refuse one uploaded image (Gradio FileData / ImageData, a data: URL, raw bytes or None) with a gr.Error
    naming the input, unless its header shows an image of a known format within the limits."""
    source, name = _source(data)
    if source is None:
        return
    try:
        check_image_file(source, name, max_pixels, max_side)
    except EngineError as exc:
        # The page shows the message as HTML: the file name is the sender's text. A refusal is no bug: no traceback.
        raise gr.Error(html.escape(f"{input_name(label)}: {exc}", quote=False), title="Cannot use this image",
                       print_exception=False) from None


def _source(data: Any) -> tuple[Any, str]:
    """(path or bytes to read, file name to show) of an upload; (None, '') when there is nothing to check."""
    if data is None:
        return None, ""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), "the pasted image"
    url, path = getattr(data, "url", None), getattr(data, "path", None)
    name = pathlib.Path(getattr(data, "orig_name", None) or path or "image").name
    if isinstance(url, str) and url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[-1], validate=False), name
        except (binascii.Error, ValueError):
            return b"", name
    return (path, name) if path else (None, "")


def _accepted(_value) -> None:
    """The upload passed its check: nothing more to do (see ``Image.render``)."""


class Image(gr.Image):
    """``gr.Image`` whose upload is checked from its header before Gradio opens it."""

    is_template = True      # the page draws it as the parent component (Gradio's own templates do the same)

    def preprocess(self, payload):
        check_upload(payload, self.label)
        return super().preprocess(payload)

    def render(self):
        super().render()
        if not getattr(self, "_reports_refusals", False):
            # The page shows a gr.Error as a message only from a queued event, and the tabs' upload helpers are
            # unqueued (fast): this queued no-op on every upload carries a refusal to the page.
            self._reports_refusals = True
            self.upload(_accepted, inputs=[self], outputs=None, queue=True, show_progress="hidden",
                        api_visibility="private", concurrency_limit=None)
        return self


class ImageEditor(gr.ImageEditor):
    """``gr.ImageEditor`` whose background, layers and composite are checked from their headers first."""

    is_template = True

    def preprocess(self, payload):
        if payload is not None:
            parts = payload
            if payload.id is not None:          # sent as blobs: Gradio keeps them in its blob storage
                parts = self.blob_storage.get(payload.id)
            if parts is not None:
                for part in [parts.background, *(parts.layers or []), parts.composite]:
                    check_upload(part, self.label)
        return super().preprocess(payload)
