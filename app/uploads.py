"""Image inputs that refuse a bad upload with the studio's own message, decided from the file's header.

Gradio's ``gr.Image`` and ``gr.ImageEditor`` open an upload with Pillow in ``preprocess``, before any handler runs:
an empty file, a text file named .png or a 30000x30000 picture fails there as "Could not preprocess input component
at index 0", and a decompression bomb is decoded before anything can refuse it. These subclasses read the header
first (``engine.images.read_header``: Pillow only, nothing decoded) and raise ``gr.Error`` naming the input, the
file and the problem; ``Blocks.preprocess_data`` re-raises a ``gr.Error`` as it is (any other exception is wrapped).
Use them as drop-in replacements: ``from app import uploads`` ... ``uploads.Image(label=..., type="filepath")``.

``NotedImage`` shows a refusal next to the field (a note under it), never as a bare "Error" badge: it checks each
upload as it arrives, clears the field and writes the message in its note; ``NotedImageEditor`` checks the chosen file
in the page (the editor draws an upload in the browser and never sends one it cannot draw).
"""
from __future__ import annotations

import base64
import binascii
import html
import json
import pathlib
from typing import Any, Optional

import gradio as gr

from engine.errors import EngineError
from engine.images import MAX_PIXELS, MAX_SIDE, check_image_file


def input_name(label: Optional[str]) -> str:
    """The input as a person knows it: its label without the hint after a colon or in brackets."""
    text = str(label or "The image").split(":")[0].split(" (")[0].strip()
    return text or "The image"


TEXT_SAMPLE = 4096          # bytes read to tell a text file from other non-images


def upload_problem(data: Any, label: Optional[str], max_pixels: int = MAX_PIXELS,
                   max_side: int = MAX_SIDE) -> Optional[str]:
    """Why one uploaded image (Gradio FileData / ImageData or its dict, a data: URL, raw bytes or None) cannot be
    used, as a plain sentence naming the input and the file (never the upload cache path); None when it can."""
    source, name = _source(data)
    if source is None:
        return None
    try:
        check_image_file(source, name, max_pixels, max_side)
    except EngineError as exc:
        message = str(exc)
        if looks_like_text(source):
            message = f"{name} is not an image (it looks like text). Use a PNG, JPEG or WebP file."
        return f"{input_name(label)}: {message}"
    return None


def looks_like_text(source: Any) -> bool:
    """Whether a file's first bytes read as text (UTF-8, no control characters but tabs and line breaks)."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            head = bytes(source[:TEXT_SAMPLE])
        else:
            with open(source, "rb") as fp:
                head = fp.read(TEXT_SAMPLE)
    except OSError:
        return False
    if not head.strip():
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:       # a sample may end inside a character
        if exc.start < len(head) - 3:
            return False
        text = head[:exc.start].decode("utf-8")
    return not any(ord(c) < 32 and c not in "\t\n\r\f" for c in text)


def check_upload(data: Any, label: Optional[str], max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> None:
    """Refuse one uploaded image (Gradio FileData / ImageData, a data: URL, raw bytes or None) with a gr.Error
    naming the input, unless its header shows an image of a known format within the limits."""
    problem = upload_problem(data, label, max_pixels, max_side)
    if problem:
        # The page shows the message as HTML: the file name is the sender's text. A refusal is no bug: no traceback.
        raise gr.Error(html.escape(problem, quote=False), title="Cannot use this image",
                       print_exception=False) from None


def note_html(message: Optional[str]) -> str:
    """A field note's HTML: the message (escaped: it names the sender's file), or nothing."""
    if not message:
        return ""
    return (f'<div class="field-note" role="alert" style="color: var(--error-text-color, #b91c1c); '
            f'font-size: 0.9rem; padding: 4px 2px;">⚠ {html.escape(message, quote=False)}</div>')


def _source(data: Any) -> tuple[Any, str]:
    """(path or bytes to read, file name to show) of an upload; (None, '') when there is nothing to check."""
    if data is None:
        return None, ""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), "the pasted image"
    if isinstance(data, dict):      # an event run without preprocessing hands over the FileData as a dict
        url, path, orig = data.get("url"), data.get("path"), data.get("orig_name")
    else:
        url, path, orig = getattr(data, "url", None), getattr(data, "path", None), getattr(data, "orig_name", None)
    name = pathlib.Path(orig or path or "image").name
    if isinstance(url, str) and url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[-1], validate=False), name
        except (binascii.Error, ValueError):
            return b"", name
    return (path, name) if path else (None, "")


def checked_path(payload: Any, label: Optional[str] = None) -> Optional[str]:
    """The file of an image field's payload as sent (an event run with ``preprocess=False``), or None when there is
    none or it is refused: for helpers that may run before the field's own check has emptied it (the refusal is
    that check's to name)."""
    if payload is None or upload_problem(payload, label):
        return None
    path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
    return str(path) if path else None


def _accepted(_value) -> None:
    """The upload passed its check: nothing more to do (see ``Image.render``)."""


class Image(gr.Image):
    """``gr.Image`` whose upload is checked from its header before Gradio opens it (a refusal is a message)."""

    is_template = True      # the page draws it as the parent component (Gradio's own templates do the same)
    # NotedImage: the refusal goes in a note under the field instead. (A class attribute, not an argument: Gradio
    # reads the component's settings from its constructor's signature, which must stay gr.Image's.)
    with_note = False

    def preprocess(self, payload):
        check_upload(payload, self.label)
        return super().preprocess(payload)

    def render(self):
        super().render()
        if getattr(self, "_reports_refusals", False):
            return self
        self._reports_refusals = True
        if self.with_note:
            self._add_note()
        else:
            # The page shows a gr.Error as a message only from a queued event, and the tabs' upload helpers are
            # unqueued (fast): this queued no-op on every upload carries a refusal to the page.
            self.upload(_accepted, inputs=[self], outputs=None, queue=True, show_progress="hidden",
                        api_visibility="private", concurrency_limit=None)
        return self

    def _add_note(self) -> None:
        """The note right after the field, and the check that fills it on every upload (run on the upload as sent,
        before Gradio opens it: a refused file empties the field, so no other event goes on reading it)."""
        self.note_box = gr.HTML("", elem_id=f"{self.elem_id or f'upload-{self._id}'}-note",
                                elem_classes=["field-note-box"], container=False, padding=False, js_on_load=None)

        def check(payload):
            problem = upload_problem(payload, self.label)
            return (None, note_html(problem)) if problem else (gr.update(), "")

        self.upload(check, inputs=[self], outputs=[self, self.note_box], preprocess=False, queue=False,
                    show_progress="hidden", api_visibility="private")
        self.clear(lambda: "", outputs=[self.note_box], queue=False, show_progress="hidden",
                   api_visibility="private")


class NotedImage(Image):
    """``Image`` whose refused upload is taken out of the field and named in a note right under it (``.note_box``),
    never shown as a toast or a bare "Error" badge on the outputs of the field's other events."""

    with_note = True


# The editor's check in the page: the first bytes of a chosen or dropped file against the image formats' signatures
# (PNG, JPEG, GIF, WebP, BMP, TIFF, AVIF/HEIC); what is not one is named in the note, worded as ``upload_problem``.
_EDITOR_CHECK_JS = """
const notes = (window.__fluxFieldNotes = window.__fluxFieldNotes || {});
const first = !notes[EDITOR_ID];
notes[EDITOR_ID] = element;
const show = (message) => {
  const box = notes[EDITOR_ID];
  box.textContent = "";
  if (!message) return;
  const div = document.createElement("div");
  div.className = "field-note";
  div.setAttribute("role", "alert");
  div.style.cssText = "color: var(--error-text-color, #b91c1c); font-size: 0.9rem; padding: 4px 2px;";
  div.textContent = "\u26a0 " + message;
  box.appendChild(div);
};
const starts = (b, sig, at = 0) => sig.every((v, i) => b[at + i] === v);
const ascii = (b, text, at = 0) => starts(b, Array.from(text, (c) => c.charCodeAt(0)), at);
const isImage = (b) => starts(b, [0x89, 0x50, 0x4e, 0x47]) || starts(b, [0xff, 0xd8, 0xff]) || ascii(b, "GIF8")
  || (ascii(b, "RIFF") && ascii(b, "WEBP", 8)) || ascii(b, "BM") || ascii(b, "II*\0") || ascii(b, "MM\0*")
  || ascii(b, "ftyp", 4);
const isText = (b) => {
  let text;
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(b.length > 4 ? b.slice(0, b.length - 4) : b); }
  catch (e) { return false; }
  return text.trim().length > 0 && !/[\x00-\x08\x0b\x0e-\x1f]/.test(text);
};
const check = async (file) => {
  if (!file) return;
  const b = new Uint8Array(await file.slice(0, 4096).arrayBuffer());
  if (b.length === 0) show(file.name + " is an empty file. Choose an image (PNG, JPEG or WebP).");
  else if (isImage(b)) show("");
  else if (isText(b)) show(file.name + " is not an image (it looks like text). Use a PNG, JPEG or WebP file.");
  else show(file.name + " is not an image (use PNG, JPEG or WebP).");
};
if (first) {
  const inside = (node) => { const root = document.getElementById(EDITOR_ID); return root && root.contains(node); };
  document.addEventListener("change", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.type === "file" && inside(t)) check(t.files && t.files[0]);
  }, true);
  document.addEventListener("drop", (e) => {
    if (inside(e.target) && e.dataTransfer && e.dataTransfer.files.length) check(e.dataTransfer.files[0]);
  }, true);
}
"""


class ImageEditor(gr.ImageEditor):
    """``gr.ImageEditor`` whose background, layers and composite are checked from their headers first."""

    is_template = True
    with_note = False        # NotedImageEditor: see NotedImage

    def render(self):
        super().render()
        if self.with_note and getattr(self, "note_box", None) is None:
            # The editor draws a chosen file in the page and never sends one it cannot draw: the check runs there.
            self.note_box = gr.HTML("", elem_id=f"{self.elem_id}-note", elem_classes=["field-note-box"],
                                    container=False, padding=False,
                                    js_on_load=_EDITOR_CHECK_JS.replace("EDITOR_ID", json.dumps(self.elem_id)))
        return self

    def preprocess(self, payload):
        if payload is not None:
            parts = payload
            if payload.id is not None:          # sent as blobs: Gradio keeps them in its blob storage
                parts = self.blob_storage.get(payload.id)
            if parts is not None:
                for part in [parts.background, *(parts.layers or []), parts.composite]:
                    check_upload(part, self.label)
        return super().preprocess(payload)


class NotedImageEditor(ImageEditor):
    """``ImageEditor`` (give it an ``elem_id``) with a note right under it naming a chosen file that is no image."""

    with_note = True


def gallery_paths(value: Any) -> list[str]:
    """The files of a gallery's value (items as paths, (path, caption) pairs or {"image": ...} dicts), in order."""
    paths = []
    for item in value or []:
        if isinstance(item, (list, tuple)) and item:
            item = item[0]
        if isinstance(item, dict):
            inner = item.get("image")
            item = item.get("path") or (inner.get("path") if isinstance(inner, dict) else inner)
        if isinstance(item, (str, pathlib.Path)) and str(item):
            paths.append(str(item))
    return paths
